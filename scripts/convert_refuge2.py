"""Convert a downloaded release into the data contract (layout: see `proxyprompt.data.convert`)."""

from __future__ import annotations

import argparse

from proxyprompt.data.convert import convert_refuge2


def main() -> None:
    parser = argparse.ArgumentParser(description=convert_refuge2.__doc__)
    parser.add_argument("src", help="the folder the release was unpacked to")
    parser.add_argument("out", help="the data-contract folder to write")
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-val", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {convert_refuge2(args.src, args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed)}")


if __name__ == "__main__":
    main()
