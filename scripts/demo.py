"""The main job on the embedded default: train the `cpu` preset briefly on generated two-object images (LiteMedSAM
backbone), segment held-out images from a support set, print Dice, write overlay PNGs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice
from PIL import Image

from proxyprompt import build_model, save_ppg
from proxyprompt.data.synthetic import LABELS, two_object_set
from proxyprompt.training import FeatureBank, make_optimizer, train_episodes

COLORS = np.array([[255, 60, 60], [60, 160, 255]], dtype=np.float32)


def overlay(image: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8 image, (N, H, W) binary masks -> (H, W, 3) uint8 with coloured translucent masks."""
    out = image.permute(1, 2, 0).numpy().astype(np.float32)
    for n, m in enumerate(masks.numpy().astype(bool)):
        out[m] = 0.5 * out[m] + 0.5 * COLORS[n % len(COLORS)]
    return out.clip(0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="training episodes")
    parser.add_argument("--train", type=int, default=16, help="training subjects (the paper uses 16)")
    parser.add_argument("--test", type=int, default=8, help="held-out subjects")
    parser.add_argument("--num-support", type=int, default=4)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("litemedsam", "cpu")
    images, masks = two_object_set(args.train + args.test, 128, seed=0)
    t0 = time.time()
    bank = FeatureBank(model, images[: args.train], masks[: args.train])
    print(f"cached LiteMedSAM features of {args.train} training images in {time.time() - t0:.0f} s", flush=True)
    train_episodes(
        model, bank, steps=args.steps, num_support=args.num_support - 1, optimizer=make_optimizer(model), log_every=25
    )
    save_ppg(model, out / "ppg.pt")

    held_out, truth = images[args.train :], masks[args.train :]
    with torch.no_grad():
        support = model.encode_support(images[: args.num_support], masks[: args.num_support])
        pred = (model.segment(held_out, support) > 0).float()
    dice = compute_dice(pred, truth).mean(0)
    for n, name in LABELS.items():
        print(f"Dice {name}: {dice[n - 1]:.3f}")
    print(f"mean Dice: {dice.mean():.3f}")
    for i in range(len(held_out)):
        side = np.concatenate([overlay(held_out[i], truth[i]), overlay(held_out[i], pred[i])], axis=1)
        Image.fromarray(side).save(out / f"overlay_{i:02d}.png")
    print(f"overlays (left: ground truth, right: prediction) and ppg.pt in {out}/")


if __name__ == "__main__":
    main()
