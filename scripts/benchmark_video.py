"""Video mode on one generated 100-frame 256x256 ultrasound-like clip, measured in one run: frames per second of
PPG + SAM 2 (support = another subject's annotated frame) against SAM 2 with a box on the clip's first frame, and the
SAM 2 baselines (MedSAM2-style support-mask propagation, SAM2-SGP-style pseudo-mask box), with Dice per object.

Without --checkpoint SAM 2 has random weights (sam2's tiny config at 256 px, no download): the speeds are real, the
Dice is not. With a SAM 2.1 checkpoint and --ppg-checkpoint (trained in video mode) both are."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from monai.metrics import compute_dice

from ppgseg.backbones.base import mask_box
from ppgseg.data.generated.families import ultrasound_video
from ppgseg.evaluation.baselines.video import first_frame_box_pass, mask_prompt_pass, pseudo_box_pass
from ppgseg.evaluation.video_protocol import video_model

NAMES = ["pubic_symphysis", "fetal_head"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--checkpoint", default=None, help="a SAM 2.1 checkpoint (random tiny SAM 2 without)")
    p.add_argument("--ppg-checkpoint", default=None)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model = video_model(a.checkpoint, a.ppg_checkpoint, a.preset, a.seed)
    rng = np.random.default_rng(a.seed)
    images, labels = ultrasound_video(rng, a.frames)
    sup_images, sup_labels = ultrasound_video(rng, 1)  # another subject
    ids = [1, 2]
    bb = model.backbone
    x, geo = bb.preprocess(torch.from_numpy(images)[:, None].float().expand(-1, 3, -1, -1))
    truth = torch.stack([torch.from_numpy(labels == i) for i in ids], 1).float()  # (F, N, H, W)
    sx, sgeo = bb.preprocess(torch.from_numpy(sup_images)[:, None].float().expand(-1, 3, -1, -1))
    smasks = bb.preprocess_masks(torch.stack([torch.from_numpy(sup_labels == i) for i in ids], 1).float(), sgeo)
    boxes = torch.stack([mask_box(m) for m in truth[0]]) * (bb.img_size / 256)
    weights = "random weights (tiny config)" if a.checkpoint is None else a.checkpoint
    print(f"{a.frames} frames 256x256, SAM 2 {weights}, preset {a.preset}, threads {torch.get_num_threads()}")
    with torch.no_grad():
        t = time.perf_counter()
        frames = model.encode_frames(x)
        encode = time.perf_counter() - t
        t = time.perf_counter()
        support = model.video_support(sx, smasks)
        setup = time.perf_counter() - t
        runs = {
            "PPG + SAM 2 (support of another subject)": lambda: model.propagate(frames, support, 0, len(frames)),
            "SAM 2, box on the first frame": lambda: first_frame_box_pass(model, frames, boxes),
            "MedSAM2-style (support mask, no P)": lambda: mask_prompt_pass(model, frames, support, 0, len(frames)),
            "SAM2-SGP-style (pseudo-mask box)": lambda: pseudo_box_pass(model, frames, support, 0, len(frames)),
        }
        rows = {}
        for name, run in runs.items():
            t = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - t
            logits = bb.postprocess(torch.stack([out[f] for f in range(len(frames))]), geo)
            rows[name] = (compute_dice((logits > 0).float(), truth, ignore_empty=True).nanmean(0), seconds)
    box = a.frames / (encode + rows["SAM 2, box on the first frame"][1])
    print(f"image encoder: {encode:.1f} s for {a.frames} frames (shared by all); support set: {setup:.2f} s")
    print("| method | " + " | ".join(f"Dice {n}" for n in NAMES) + " | propagation s | frames/s with encoder | x box |")
    print("|---|" + "---|" * (len(NAMES) + 3))
    for name, (dice, seconds) in rows.items():
        fps = a.frames / (encode + seconds)
        cells = " | ".join(f"{v:.3f}" for v in dice.tolist())
        print(f"| {name} | {cells} | {seconds:.1f} | {fps:.2f} | {fps / box:.2f}x |")


if __name__ == "__main__":
    from ppgseg.runtime import pad_heap

    pad_heap()  # freed heap memory kept: CPU forwards stop paying page faults
    main()
