"""The paper's video comparison (Fig. 4) on any clip folder: PPG + SAM 2 and SAM 2 baselines on the test clips, each
support-based method over several support draws (an annotated frame of a training clip of another subject), Dice
averaged over frames, clips and objects; written as a markdown report with a box plot.

Methods: PPG + SAM 2 (support; the proxy prompt in memory attention), MedSAM2-style (support mask as first-frame
mask prompt, plain propagation), SAM2-SGP-style (support memories -> pseudo-mask -> box), and SAM 2 prompted on the
target's own first frame by its ground truth: one random point, the box, the mask ("upper").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice
from torch import Tensor
from tqdm import tqdm

from ..backbones.base import mask_box
from ..build import build_model
from ..data.contract import read_labels
from ..data.video import Clip, load_clips
from ..modeling.proxy_sam2_video import Frames, ProxyPromptVideo, VideoSupport
from .baselines.video import box_points, first_frame_pass, mask_prompt_pass, pseudo_box_pass

SUPPORT_METHODS = ("PPG + SAM 2", "MedSAM2-style", "SAM2-SGP-style")
TARGET_METHODS = ("SAM 2 point (GT, frame 0)", "SAM 2 box (GT, frame 0)", "upper: SAM 2 mask (GT, frame 0)")


def video_model(checkpoint: str | None, ppg_checkpoint: str | None, preset: str, seed: int = 0) -> ProxyPromptVideo:
    """The scripts' video model: SAM 2 from ``checkpoint``, or with random weights (sam2's tiny config at 256 px)."""
    torch.manual_seed(seed)
    return build_model(
        "sam2", preset, checkpoint, ppg_checkpoint, pretrained=checkpoint is not None,
        backbone_kwargs=None if checkpoint else {"image_size": 256}, video=True,
    )  # fmt: skip


@dataclass
class Encoded:
    """A clip in the encoder's frame: its frames' features, ground truth (F, N, H0, W0) and frame-0 masks (N, S, S)."""

    frames: Frames
    truth: Tensor
    first: Tensor
    geo: object


class VideoProtocol:
    """Fig. 4 on ``dataset`` (test clips; supports from the training clips), ``draws`` support draws."""

    def __init__(self, model: ProxyPromptVideo, dataset: str | Path, *, draws: int = 5, seed: int = 0) -> None:
        self.model, self.dataset, self.draws, self.seed = model.eval(), Path(dataset), draws, seed
        self.labels = read_labels(dataset)
        self.ids = list(self.labels)
        self.train, self.test = load_clips(dataset, "training"), load_clips(dataset, "test")
        self.results: dict = {}

    def encode(self, clip: Clip) -> Encoded:
        bb = self.model.backbone
        x, geo = bb.preprocess(clip.byte_frames())
        masks = clip.masks(self.ids)
        with torch.no_grad():
            frames = self.model.encode_frames(x)
        return Encoded(frames, masks, bb.preprocess_masks(masks[:1], geo)[0], geo)

    def support(self, draw: int) -> tuple[str, VideoSupport]:
        """An annotated frame of a training clip showing every object (a different one per draw)."""
        rng = np.random.default_rng([self.seed, draw])
        for _ in range(200):
            clip = self.train[int(rng.integers(len(self.train)))]
            f = int(rng.integers(len(clip)))
            masks = clip.masks(self.ids)[f : f + 1]
            if bool(masks.flatten(2).amax(2).all()):
                bb = self.model.backbone
                x, geo = bb.preprocess(clip.byte_frames()[f : f + 1])
                with torch.no_grad():
                    return f"{clip.name}#{f}", self.model.video_support(x, bb.preprocess_masks(masks, geo))
        raise ValueError(f"{self.dataset}: no training frame shows every object {self.ids}")

    def run_method(self, name: str, clip: Encoded, support: VideoSupport | None, seed: int) -> np.ndarray:
        """Dice per object of one method on one clip (mean over frames showing the object)."""
        m, n, frames = self.model, len(self.ids), clip.frames
        if name == "PPG + SAM 2":
            out = m.propagate(frames, support, 0, len(frames))
        elif name == "MedSAM2-style":
            out = mask_prompt_pass(m, frames, support, 0, len(frames))
        elif name == "SAM2-SGP-style":
            out = pseudo_box_pass(m, frames, support, 0, len(frames))
        elif name.startswith("upper"):
            out = first_frame_pass(m, frames, n, mask_inputs=clip.first[:, None])
        else:
            boxes, points = [], []
            rng = np.random.default_rng(seed)
            for mask in clip.first:
                boxes.append(mask_box(mask))
                ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
                j = int(rng.integers(len(ys)))
                points.append(torch.stack([xs[j], ys[j]]).float() + 0.5)
            if name.startswith("SAM 2 box"):
                prompt = box_points(torch.stack(boxes))
            else:
                prompt = {
                    "point_coords": torch.stack(points)[:, None],
                    "point_labels": torch.ones(n, 1, dtype=torch.int32),
                }
            out = first_frame_pass(m, frames, n, point_inputs=prompt)
        logits = m.backbone.postprocess(torch.stack([out[f] for f in range(len(frames))]), clip.geo)
        return compute_dice((logits > 0).float(), clip.truth, ignore_empty=True).nanmean(0).numpy()

    @torch.no_grad()
    def run(self) -> dict:
        clips = [self.encode(c) for c in tqdm(self.test, desc="encoding test clips")]
        res = {"support": {}, "dice": {}}
        for d in tqdm(range(self.draws), desc="support draws"):
            name, support = self.support(d)
            res["support"][d] = name
            for method in (*SUPPORT_METHODS, *TARGET_METHODS):
                scores = [self.run_method(method, c, support, seed=1000 * d + i) for i, c in enumerate(clips)]
                res["dice"].setdefault(method, []).append(np.nanmean(np.stack(scores), axis=0).tolist())
        self.results = res
        return res

    def write(self, out: str | Path, note: str = "") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.results, indent=2))
        names = list(self.labels.values())
        lines = [
            f"# Video comparison (Fig. 4): {self.dataset.name}",
            "",
            f"{len(self.test)} test clips; {self.draws} support draws, each one annotated frame of a training clip "
            f"(another subject): {', '.join(self.results['support'].values())}. Dice per object averaged over the "
            f"frames showing it and over clips; mean over the objects, then over the draws. {note}",
            "",
            "| method | " + " | ".join(names) + " | mean | std over draws | range over draws |",
            "|" + "---|" * (len(names) + 4),
        ]
        per_draw = {}
        for method, draws in self.results["dice"].items():
            d = np.array(draws)  # (draws, objects)
            per_draw[method] = np.nanmean(d, axis=1)
            cells = " | ".join(f"{v:.3f}" for v in np.nanmean(d, axis=0))
            m = per_draw[method]
            lines.append(f"| {method} | {cells} | {m.mean():.3f} | {m.std():.3f} | {np.ptp(m):.3f} |")
        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.boxplot(list(per_draw.values()))
        ax.set_xticks(range(1, len(per_draw) + 1), [k.split(" (")[0] for k in per_draw], rotation=15, fontsize=7)
        ax.set(ylabel="mean Dice", title=f"Dice over {self.draws} support draws")
        fig.tight_layout()
        fig.savefig(out / "fig4_video.png", dpi=110)
        plt.close(fig)
        lines += ["", "![Fig. 4](fig4_video.png)", ""]
        path = out / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return path
