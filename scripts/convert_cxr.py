"""Convert a downloaded release into the data contract (layout: see `ppgseg.data.convert.convert_cxr`)."""

from ppgseg.data.convert import cli, convert_cxr

if __name__ == "__main__":
    cli(convert_cxr)
