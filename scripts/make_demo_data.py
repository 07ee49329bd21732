"""Generate the demo datasets (fundus-like, ultrasound-like, CT-like; with --videos ultrasound-like clips; with
--random-tasks procedurally generated tasks) in the data contract; deterministic, offline."""

from __future__ import annotations

import argparse

from ppgseg.data.generated.families import FAMILIES, write_family, write_studies
from ppgseg.data.generated.tasks import write_tasks
from ppgseg.data.video import write_demo_videos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--families", nargs="+", default=sorted(FAMILIES), choices=sorted(FAMILIES))
    parser.add_argument("--n-train", type=int, default=16, help="training pairs (the paper uses 16)")
    parser.add_argument("--n-val", type=int, default=4)
    parser.add_argument("--n-test", type=int, default=16, help="held-out pairs (the paper keeps 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--studies",
        default=None,
        help="instead: write CT-like studies for the MONAI Label app into this folder (datastore layout)",
    )
    parser.add_argument("--n-studies", type=int, default=8)
    parser.add_argument("--n-labelled", type=int, default=3, help="studies with a final label (with --studies)")
    parser.add_argument(
        "--videos",
        action="store_true",
        help="instead: write ultrasound-like clips (OUT/ultrasound_video) for video mode",
    )
    parser.add_argument("--frames", type=int, default=20, help="frames per clip (with --videos)")
    parser.add_argument(
        "--random-tasks",
        type=int,
        default=0,
        help="instead: write this many domain-randomised tasks (OUT/random/task_XXX; --n-train, --n-test images)",
    )
    parser.add_argument("--size", type=int, default=256, help="image side of the random tasks")
    args = parser.parse_args()
    if args.random_tasks:
        folders = write_tasks(
            f"{args.out}/random", n_tasks=args.random_tasks, n_images=args.n_train, n_test=args.n_test,
            size=args.size, seed=args.seed,
        )  # fmt: skip
        print(f"wrote {len(folders)} random tasks to {args.out}/random")
        return
    if args.videos:
        folder = write_demo_videos(
            args.out, n_train=8, n_val=2, n_test=4, frames=args.frames, seed=args.seed
        )  # clips, split by subject
        print(f"wrote 14 clips of {args.frames} frames to {folder}")
        return
    if args.studies:
        folder = write_studies(args.studies, n_studies=args.n_studies, n_labelled=args.n_labelled, seed=args.seed)
        print(f"wrote {args.n_studies} studies ({args.n_labelled} labelled) to {folder}")
        return
    for family in args.families:
        folder = write_family(
            args.out, family, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed
        )
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
