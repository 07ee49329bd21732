"""Convert a downloaded release into the data contract (layout: see `ppgseg.data.convert.convert_refuge2`)."""

from ppgseg.data.convert import cli, convert_refuge2

if __name__ == "__main__":
    cli(convert_refuge2)
