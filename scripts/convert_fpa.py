"""Convert a downloaded release into the data contract (layout: see `ppgseg.data.convert.convert_fpa`)."""

from ppgseg.data.convert import cli, convert_fpa

if __name__ == "__main__":
    cli(convert_fpa)
