"""Convert a downloaded release into the data contract (layout: see `ppgseg.data.convert.convert_drive`)."""

from ppgseg.data.convert import cli, convert_drive

if __name__ == "__main__":
    cli(convert_drive, n_train=20, n_val=0)
