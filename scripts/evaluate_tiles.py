"""Native-resolution tiles against one down-scaled pass, with and without training, on a data-contract folder.

Rows, for each way of passing an image (--passes: 0 = one down-scaled pass, T = tiles of T pixels; a tile smaller
than the encoder's input is magnified to it): the given weights (default: the bundle's) with no training (unless
--trained-only); the same weights trained --steps episodes on the first --train-pairs training pairs, cut into the
same tiles (with --ablations, also the paper's Table 2 ablations, each trained the same way on the same episodes);
and (--finetune-steps) the decoder fine-tune peer trained on the same tiles. K supports from the training
split (cut into the same tiles as the targets), every test image; Dice per object (MONAI). Also the seconds per test
image of each way, measured in this run. Writes a markdown table and tiles.json.
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
from ppgseg.build import build_backbone
from ppgseg.data.contract import read_labels
from ppgseg.data.intensity import to_byte_range
from ppgseg.data.splits import split_samples
from ppgseg.data.tiles import tile_pairs, tile_samples
from ppgseg.evaluation.baselines import DecoderFineTune, Pairs
from ppgseg.evaluation.baselines.base import Target
from ppgseg.evaluation.protocol import ABLATIONS, LOSSES
from ppgseg.inference.tiles import NativeTileInferer, segment_tiled
from ppgseg.training import OPTIMIZERS, EpisodeBank, make_optimizer, train_episodes


def evaluate(predict, tests, ids) -> tuple[list[float], float, list[list[float]]]:
    """Mean Dice per object over ``tests``, seconds per image, and Dice per image and object (NaN where the image
    lacks the object); ``predict``: (1, C, H, W) uint8 -> (1, N, H, W)."""
    scores, seconds = [], []
    with torch.no_grad():
        for s in tests:
            t = time.perf_counter()
            logits = predict(to_byte_range(s.image)[None])
            seconds.append(time.perf_counter() - t)
            truth = s.masks(ids)[None]
            scores.append(compute_dice((logits > 0).float(), truth, ignore_empty=True)[0].numpy())
    per_image = np.stack(scores)
    return np.nanmean(per_image, axis=0).tolist(), float(np.mean(seconds)), per_image.tolist()


def ppg(model, support, ids, tile: int | None):
    """PPG with K ``support`` samples (cut into the targets' tiles if ``tile``), their embedding computed once."""
    images = torch.stack([to_byte_range(s.image) for s in support])
    masks = torch.stack([s.masks(ids) for s in support])
    if tile:
        images, masks = tile_pairs(images, masks, tile)
    with torch.no_grad():
        emb = model.encode_support(images, masks)
    return (lambda x: segment_tiled(model, x, emb, tile=tile)) if tile else (lambda x: model.segment(x, emb))


def finetune(train, ids, tile: int | None, steps: int, seed: int):
    """The decoder fine-tune peer (`DecoderFineTune`) trained on ``train`` (cut into tiles if ``tile``)."""
    backbone = build_backbone("litemedsam").eval()
    method = DecoderFineTune(backbone, steps=steps)
    method.fit(Pairs.encode(backbone, tile_samples(train, tile) if tile else train, ids), seed=seed)

    def one(x):  # (1, C, h, w) uint8 -> (1, N, h, w)
        xi, geo = backbone.preprocess(x)
        return method.predict(Target(x[0], xi, geo, backbone.encode(xi), x.new_zeros(1, len(ids), *x.shape[-2:])))

    return (lambda x: NativeTileInferer(tile)(x, one)) if tile else one


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
    p.add_argument("--steps", type=int, default=200, help="PPG training episodes (0: no trained PPG rows)")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--loss", choices=sorted(LOSSES), default="dicece")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd: the paper's")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: SGD 0.01, AdamW 1e-3)")
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument(
        "--finetune-steps", type=int, default=0, help="also the decoder fine-tune peer, trained so many steps (0: not)"
    )
    p.add_argument(
        "--ablations", action="store_true", help="also Table 2's CSM / CCM ablations (with --ppg-checkpoint none)"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    labels = read_labels(a.dataset)
    ids, names = list(labels), list(labels.values())
    train = split_samples(a.dataset, "training")[: a.train_pairs]
    tests = split_samples(a.dataset, "test")[: a.max_test]
    support = train[: a.support]
    ckpt = None if a.ppg_checkpoint == "none" else a.ppg_checkpoint

    def model(**overrides):
        torch.manual_seed(a.seed)
        return build_model("litemedsam", "cpu", ppg_checkpoint=ckpt, prompt=a.prompt, **overrides)

    rows = {}
    base = model()
    passes = [t or None for t in a.passes]

    def way(tile: int | None) -> str:
        return f"tiles of {tile}" if tile else "one pass"

    for tile in [] if a.trained_only else passes:
        key = f"{'start weights' if ckpt else 'untrained'}, {way(tile)}"
        rows[key] = evaluate(ppg(base, support, ids, tile), tests, ids)
        print(key, rows[key][:2], flush=True)
    variants = ABLATIONS if a.ablations else {"": {}}
    for tile in passes if a.steps else []:
        bank = None  # encoder features of the training tiles, shared by the variants (the encoder is frozen)
        for variant, overrides in variants.items():
            m = model(**overrides)
            if bank is None:
                bank = EpisodeBank(m, tile_samples(train, tile) if tile else train, ids, views=a.views, seed=a.seed)
            t = time.time()
            train_episodes(
                m,
                bank,
                steps=a.steps,
                num_support=a.support,
                optimizer=make_optimizer(m, lr=a.lr, kind=a.optimizer),
                seed=a.seed,
                loss_fn=LOSSES[a.loss](sigmoid=True),
                progress=f"training {variant or 'PPG'}, tile {tile}",
            )
            seconds = time.time() - t
            key = f"trained {a.steps} episodes ({a.optimizer}) on {len(train)} pairs, {way(tile)}"
            key = f"{variant}: {key}" if variant else key
            rows[key] = evaluate(ppg(m, support, ids, tile), tests, ids)
            print(key, rows[key][:2], f"({seconds:.0f} s training)", flush=True)
    for tile in passes if a.finetune_steps else []:
        t = time.time()
        key = f"decoder fine-tune, {a.finetune_steps} steps on {len(train)} pairs, {way(tile)}"
        rows[key] = evaluate(finetune(train, ids, tile, a.finetune_steps, a.seed), tests, ids)
        print(key, rows[key][:2], f"({time.time() - t:.0f} s with training)", flush=True)
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
    from ppgseg.runtime import pad_heap

    pad_heap()  # freed heap memory kept: CPU forwards stop paying page faults
    main()
