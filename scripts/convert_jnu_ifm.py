"""Convert a downloaded release into the data contract (layout: see `proxyprompt.data.convert.convert_jnu_ifm`)."""

from proxyprompt.data.convert import cli, convert_jnu_ifm

if __name__ == "__main__":
    cli(convert_jnu_ifm)
