"""Convert a downloaded release into the data contract (layout: see `ppgseg.data.convert.convert_jnu_ifm`)."""

from ppgseg.data.convert import cli, convert_jnu_ifm

if __name__ == "__main__":
    cli(convert_jnu_ifm)
