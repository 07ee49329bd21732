"""Native-resolution tiles against one down-scaled pass, with and without training, on a data-contract folder.

Rows, for each way of passing an image (--passes: 0 = one down-scaled pass, T = tiles of T pixels): the given weights
(default: the bundle's) with no training (unless --trained-only); then the same weights trained --steps episodes on the
first --train-pairs training pairs, cut into the same tiles. A tile smaller than the encoder's input is magnified to
it (128-pixel tiles into LiteMedSAM's 256: twice native resolution, for structures thinner than its 4-pixel feature
cells). K supports from the training split (cut into the same tiles as the targets), every test image; Dice per
object (MONAI). Also the seconds per test image of each way, measured in this run. Writes a markdown table and
tiles.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice

from ppgseg import build_model
from ppgseg.data.contract import read_labels
from ppgseg.data.episodes import to_byte_range
from ppgseg.protocol import LOSSES
from ppgseg.tiling import segment_tiled, tile_pairs, tile_samples
from ppgseg.training import OPTIMIZERS, EpisodeBank, make_optimizer, train_episodes
from ppgseg.workflows import split_samples


def evaluate(model, support, tests, ids, tile: int | None) -> tuple[list[float], float]:
    """Mean Dice per object over ``tests`` and seconds per image, with K ``support`` samples (tiled if ``tile``)."""
    images = torch.stack([to_byte_range(s.image) for s in support])
    masks = torch.stack([s.masks(ids) for s in support])
    if tile:
        images, masks = tile_pairs(images, masks, tile)
    scores, seconds = [], []
    with torch.no_grad():
        emb = model.encode_support(images, masks)
        for s in tests:
            t = time.perf_counter()
            x = to_byte_range(s.image)[None]
            logits = segment_tiled(model, x, emb, tile=tile) if tile else model.segment(x, emb)
            seconds.append(time.perf_counter() - t)
            truth = s.masks(ids)[None]
            scores.append(compute_dice((logits > 0).float(), truth, ignore_empty=True)[0].numpy())
    return np.nanmean(np.stack(scores), axis=0).tolist(), float(np.mean(seconds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ppg-checkpoint", default="bundle/models/model.pt", help="start weights ('none': from scratch)")
    p.add_argument("--prompt", default="transfer")
    p.add_argument(
        "--passes", type=int, nargs="+", default=[0, 256], help="0: one pass; T: tiles of T pixels (encoder input: 256)"
    )
    p.add_argument("--trained-only", action="store_true", help="leave out the rows with no training")
    p.add_argument("--train-pairs", type=int, default=16)
    p.add_argument("--support", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--loss", choices=sorted(LOSSES), default="dicece")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd: the paper's")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: SGD 0.01, AdamW 1e-3)")
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    labels = read_labels(a.dataset)
    ids, names = list(labels), list(labels.values())
    train = split_samples(a.dataset, "training")[: a.train_pairs]
    tests = split_samples(a.dataset, "test")[: a.max_test]
    support = train[: a.support]
    ckpt = None if a.ppg_checkpoint == "none" else a.ppg_checkpoint

    def model():
        torch.manual_seed(a.seed)
        return build_model("litemedsam", "cpu", ppg_checkpoint=ckpt, prompt=a.prompt)

    rows = {}
    base = model()
    passes = [t or None for t in a.passes]

    def way(tile: int | None) -> str:
        return f"tiles of {tile}" if tile else "one pass"

    for tile in [] if a.trained_only else passes:
        key = f"{'start weights' if ckpt else 'untrained'}, {way(tile)}"
        rows[key] = evaluate(base, support, tests, ids, tile)
        print(key, rows[key], flush=True)
    for tile in passes:
        m = model()
        samples = tile_samples(train, tile) if tile else train
        bank = EpisodeBank(m, samples, ids, views=a.views, seed=a.seed)
        t = time.time()
        train_episodes(
            m,
            bank,
            steps=a.steps,
            num_support=a.support,
            optimizer=make_optimizer(m, lr=a.lr, kind=a.optimizer),
            seed=a.seed,
            loss_fn=LOSSES[a.loss](sigmoid=True),
            progress=f"training, tile {tile}",
        )
        key = f"trained {a.steps} episodes ({a.optimizer}) on {len(train)} pairs, {way(tile)}"
        rows[key] = evaluate(m, support, tests, ids, tile)
        print(key, rows[key], f"({time.time() - t:.0f} s training)", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "tiles.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}))
    lines = [
        f"| {a.dataset.name}, K = {a.support} | " + " | ".join(names) + " | s / image |",
        "|" + "---|" * (len(names) + 2),
    ]
    lines += [f"| {k} | " + " | ".join(f"{d:.3f}" for d in v[0]) + f" | {v[1]:.2f} |" for k, v in rows.items()]
    (a.out / "tiles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
