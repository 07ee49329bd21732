"""Convert a downloaded release into the data contract (layout: see `proxyprompt.data.convert.convert_refuge2`)."""

from proxyprompt.data.convert import cli, convert_refuge2

if __name__ == "__main__":
    cli(convert_refuge2)
