"""Videos and volumes in the data contract: the frames of one clip, in order.

A clip is either the slices of one 3D study (samples ``path#axis:index``) or 2D frames named ``<video>_<frame>``
(the JNU-IFM converter's output and the generated demo videos). Frames without any object are kept out of 3D
studies by `load_samples`; 2D frames are read as listed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .contract import Sample, load_samples, read_split
from .convert import split_ids, write_contract
from .generated.families import ultrasound_video
from .intensity import to_byte_range

FRAME = re.compile(r"^(?P<video>.+)_(?P<frame>\d+)$")


@dataclass
class Clip:
    """One video or volume: ``frames`` as loaded (F, C, H, W), ``labels`` (F, H, W) int64, its ``name``."""

    name: str
    frames: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.frames.shape[0]

    def byte_frames(self) -> Tensor:
        """(F, 3, H, W) float in [0, 255], frame by frame as `to_byte_range` brings a 2D sample."""
        return torch.stack([to_byte_range(f) for f in self.frames])

    def masks(self, label_ids: list[int]) -> Tensor:
        """(F, N, H, W) float binary masks, one channel per label id in that order."""
        return torch.stack([(self.labels == o).float() for o in label_ids], dim=1)


def frame_of(sample: Sample) -> tuple[str, int]:
    """(clip name, frame index) of a sample: a 3D study's slice, or a 2D frame named ``<video>_<frame>``."""
    if "#" in sample.source:
        path, where = sample.source.split("#", 1)
        return path, int(where.split(":")[1])
    stem = Path(sample.source).name.split(".")[0]
    match = FRAME.match(stem)
    if match is None:
        raise ValueError(f"{sample.source}: a video frame must be named <video>_<frame> (e.g. clip01_0007.png)")
    return match["video"], int(match["frame"])


def as_clips(samples: list[Sample]) -> list[Clip]:
    """Group samples into clips, frames in order; clips sorted by name."""
    groups: dict[str, list[tuple[int, Sample]]] = {}
    for s in samples:
        name, index = frame_of(s)
        groups.setdefault(name, []).append((index, s))
    clips = []
    for name in sorted(groups):
        frames = [s for _, s in sorted(groups[name], key=lambda p: p[0])]
        shapes = {tuple(s.image.shape) for s in frames}
        if len(shapes) > 1:
            raise ValueError(f"clip {name}: frames of different shapes {sorted(shapes)}")
        clips.append(Clip(name, torch.stack([s.image for s in frames]), torch.stack([s.label for s in frames])))
    return clips


def load_clips(folder: str | Path, split: str, *, axis: int = 2) -> list[Clip]:
    """The clips of one split of a data-contract folder."""
    clips = as_clips(load_samples(read_split(folder, split), axis=axis))
    if not clips:
        raise ValueError(f"{Path(folder) / 'dataset.json'}: the {split!r} list has no labelled frame")
    return clips


def write_demo_videos(
    root: str | Path, *, n_train: int, n_val: int, n_test: int, frames: int = 20, size: int = 256, seed: int = 0
) -> Path:
    """Generated ultrasound-like clips (descending fetal head, pubic symphysis) as 2D frames ``<video>_<frame>``
    in a data-contract folder ``root/ultrasound_video``, split by video."""
    rng = np.random.default_rng([seed, 7])
    pairs = []
    for v in range(n_train + n_val + n_test):
        images, labels = ultrasound_video(rng, frames, size)
        pairs += [(f"us{v:03d}_{f:04d}", images[f], labels[f]) for f in range(frames)]
    video = {p[0]: p[0].rsplit("_", 1)[0] for p in pairs}
    splits = split_ids(list(video), n_train, n_val, seed, group=video.__getitem__)
    labels = {1: "pubic_symphysis", 2: "fetal_head"}
    return write_contract(Path(root) / "ultrasound_video", "ppgseg demo ultrasound video", labels, pairs, splits)


class ClipDataset(Dataset):
    """The clips of one split: dicts of image (F, 3, H, W) in [0, 255], label (F, N, H, W) one channel per requested
    object, and source (the clip's name). Use with ``DataLoader(batch_size=None)``."""

    def __init__(self, folder: str | Path, label_ids: Sequence[int], *, split: str = "validation", axis: int = 2):
        self.clips, self.label_ids = load_clips(folder, split, axis=axis), list(label_ids)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        c: Clip = self.clips[index]
        return {"image": c.byte_frames(), "label": c.masks(self.label_ids), "source": c.name}
