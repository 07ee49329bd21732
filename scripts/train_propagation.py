"""Train PPG weights for propagation from drawn slices on labelled volumes of a data-contract folder's training split:
in each study, n slices spread over the object are taken as drawn and the rest is segmented as `propagate` segments
it (`PropagationEpisodes`), Dice + cross-entropy against the study's label. Writes a PPG checkpoint that
`scripts/evaluate_volumes.py --ppg-checkpoint` and the bundle read.

    .venv/bin/python scripts/train_propagation.py ../shared/realdata/hippocampus_mri --out runs/propagation.pt
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ppgseg.build import build_model
from ppgseg.checkpoint import save_ppg
from ppgseg.data.contract import read_labels, read_split
from ppgseg.evaluation.volumes import VolumeStudy, encoded_study, volume_parser
from ppgseg.training.propagation import PropagationEpisodes
from ppgseg.training.registered import RegistrationFineTune


def main() -> None:
    p = volume_parser(
        __doc__, "data-contract folder with labelled training volumes", "start weights (default: the bundle's)"
    )
    p.add_argument("--out", type=Path, required=True, help="the PPG checkpoint to write")
    p.add_argument("--studies", type=int, default=16, help="training studies (seeded order of the training split)")
    p.add_argument("--drawn", type=int, default=3, help="slices taken as drawn per study")
    p.add_argument("--episodes", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = build_model(a.backbone, "cpu", a.checkpoint, a.ppg_checkpoint)
    items = read_split(a.folder, "training")
    if a.studies < 1 or a.studies > len(items):
        raise SystemExit(f"--studies must be in 1..{len(items)} (the training split of {a.folder}), got {a.studies}")
    order = np.random.default_rng(a.seed).permutation(len(items))[::-1]  # the protocol's atlases come first
    studies = [VolumeStudy.read(items[int(i)]) for i in order[: a.studies]]
    start = time.monotonic()
    volumes = [encoded_study(model, s, a.axis, a.cache / a.backbone) for s in studies]
    logging.info("encoded %d studies in %.0f s", len(studies), time.monotonic() - start)
    data = PropagationEpisodes(
        model, volumes, [s.image for s in studies], [s.label for s in studies], list(read_labels(a.folder)), a.axis,
        drawn=a.drawn,
    )  # fmt: skip
    logging.info("%d episodes from %d studies", len(data), len(studies))
    tuned = RegistrationFineTune(episodes=a.episodes, lr=a.lr, seed=a.seed, checks=64)(model, data)
    print(f"{tuned.episodes} episodes in {tuned.seconds:.0f} s, check loss {tuned.before:.3f} -> {tuned.after:.3f}, "
          f"kept: {tuned.kept}")  # fmt: skip
    print(f"wrote {save_ppg(model, a.out, seed=a.seed)}")


if __name__ == "__main__":
    from ppgseg.runtime import pad_heap

    pad_heap()
    main()
