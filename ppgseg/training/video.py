"""Episodic training in video mode (paper Sec. 3.3): the support is an annotated frame of *another* subject's clip, the
target a run of consecutive frames of this clip, segmented by propagation with the proxy prompt in memory attention."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.video import Clip
from ..modeling.proxy_sam2_video import ProxyPromptVideo


class ClipBank:
    """Clips in the encoder's frame: x (F, 3, S, S), masks (F, L, S, S) one channel per label id, and their SAM 2
    features (computed once: the encoder is frozen in video mode unless it carries LoRA).

    Args:
        model: the ProxyPromptVideo being trained.
        clips: two or more clips (episodes take the support from another clip than the target).
        label_ids: the dataset's objects.
        length: frames per target run.
    """

    def __init__(self, model: ProxyPromptVideo, clips: Sequence[Clip], label_ids: Sequence[int], *, length: int = 3):
        if len(clips) < 2:
            raise ValueError(f"video episodes need clips of at least 2 subjects, got {len(clips)}")
        if length < 1:
            raise ValueError(f"length must be >= 1 frame, got {length}")
        self.label_ids, self.length = list(label_ids), length
        bb = model.backbone
        self.x, self.masks, self.frames = [], [], []
        for clip in clips:
            x, geo = bb.preprocess(clip.byte_frames())
            self.x.append(x)
            self.masks.append(bb.preprocess_masks(clip.masks(self.label_ids), geo))
            with torch.no_grad():
                self.frames.append(model.encode_frames(x))
        self.shows = [m.flatten(2).amax(2) > 0 for m in self.masks]  # per clip (F, L): frame f shows object l

    def __len__(self) -> int:
        return len(self.x)

    def draw(self, rng: np.random.Generator, num_support: int = 1) -> dict:
        """A random episode: target clip and first frame, support clip and frames (another clip), the objects that
        the support frames and the target run both show (label indices)."""
        for _ in range(100):
            c, s = (int(i) for i in rng.choice(len(self), 2, replace=False))
            n_frames = self.x[c].shape[0]
            start = int(rng.integers(max(n_frames - self.length, 0) + 1))
            run = slice(start, min(start + self.length, n_frames))
            sup = [int(i) for i in rng.choice(self.x[s].shape[0], min(num_support, self.x[s].shape[0]), replace=False)]
            shown = self.shows[s][sup].any(0) & self.shows[c][run].any(0)
            if shown.any():
                objects = torch.nonzero(shown).flatten().tolist()
                return {"target": c, "start": start, "support_clip": s, "support": sup, "objects": objects}
        raise ValueError("no two clips show a common object: check the labels")


class VideoEpisodeNet(nn.Module):
    """One video episode -> (low-res logits (L, N, h, w), ground truth of the same shape)."""

    def __init__(self, model: ProxyPromptVideo, bank: ClipBank) -> None:
        super().__init__()
        self.model, self.bank = model, bank

    def forward(self, episode: dict) -> tuple[Tensor, Tensor]:
        b, m = self.bank, self.model
        s, sup, objects = episode["support_clip"], episode["support"], episode["objects"]
        support = m.video_support(b.x[s][sup], b.masks[s][sup][:, objects], b.frames[s].select(sup))
        run = slice(episode["start"], episode["start"] + b.length)
        frames = b.frames[episode["target"]].select(run)
        out = m.propagate(frames, support, 0, len(frames))
        logits = torch.stack([out[f] for f in range(len(frames))])  # (L, N, h, w)
        truth = F.interpolate(b.masks[episode["target"]][run][:, objects], size=logits.shape[-2:], mode="area")
        return logits, (truth > 0.5).float()

    def train(self, mode: bool = True) -> VideoEpisodeNet:
        self.model.train(mode)
        return self
