"""Convert a downloaded release into the data contract (layout: see `ppgseg.data.convert.convert_stare`)."""

from ppgseg.data.convert import cli, convert_stare

if __name__ == "__main__":
    cli(convert_stare, n_val=0)
