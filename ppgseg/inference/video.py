"""Video mode inference (SAM 2, the proxy prompt in memory attention): a support set as conditioning memories, clips
and volumes propagated from it, and folder inference of clips."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..data.intensity import to_byte_range
from ..data.video import FRAME
from ..io import FRAME_SUFFIXES, label_suffix, read_image, stem, suffix, write_label
from ..modeling.proxy_sam2_video import ProxyPromptVideo, VideoSupport
from .folder import FolderSegmenter
from .slices import as_slices, to_label
from .support import SupportSet


def video_support(model: ProxyPromptVideo, support) -> VideoSupport:
    """A support set (``samples`` and ``label_ids``: a `SupportSet`, or the app's support) as SAM 2 conditioning
    memories + the PPG embedding."""
    images = torch.stack([to_byte_range(s.image) for s in support.samples])
    masks = torch.stack([s.masks(support.label_ids) for s in support.samples])
    x, m = model.prepare_support(images, masks)
    return model.video_support(x, m)


def label_clip(model: ProxyPromptVideo, slices: Tensor, support: VideoSupport, label_ids, start: int) -> Tensor:
    """(F, C, H, W) frames or slices as read -> (F, H, W) uint8 label map (`to_label`), propagated both ways from
    frame ``start``."""
    frames = torch.stack([to_byte_range(s) for s in slices]).to(model.backbone.device)
    with torch.no_grad():
        return to_label(segment_clip(model, frames, support, start).cpu(), label_ids)


def segment_clip(model: ProxyPromptVideo, frames: Tensor, support: VideoSupport, start: int = 0) -> Tensor:
    """(F, C, H, W) frames as loaded -> (F, N, H, W) logits at their size, propagated both ways from ``start``."""
    x, geo = model.backbone.preprocess(frames)
    low = model.segment_video(model.encode_frames(x), {start: support})
    return model.backbone.postprocess(torch.stack(low), geo)


class VideoFolderSegmenter(FolderSegmenter):
    """Segments every clip of a folder by propagation from one support set (frames of other subjects), the support
    encoded once: each 3D volume is a clip (its slices along ``axis``, written back as one NIfTI label with the
    volume's geometry); 2D frames named ``<video>_<frame>`` make one clip per video (one PNG label per frame).
    Propagation starts at ``start_fraction`` of the clip (0: first frame, 0.5: middle slice) and runs both ways.
    A clip that cannot be read or segmented is reported and skipped; the others are still written."""

    def __init__(
        self, model: ProxyPromptVideo, support: SupportSet, *, axis: int = 2, start_fraction: float = 0.0
    ) -> None:
        if not 0 <= start_fraction <= 1:
            raise ValueError(f"start_fraction must be in [0, 1], got {start_fraction}")
        super().__init__(model, support, axis=axis)
        self.start_fraction = start_fraction

    def encode_support(self) -> VideoSupport:
        return video_support(self.model, self.support)

    def group(self, inputs: list[Path]) -> dict[str, list[Path]]:
        """A volume is a clip; 2D frames named ``<video>_<frame>`` are one clip per video."""
        clips: dict[str, list[Path]] = {}
        for path in inputs:
            match = FRAME.match(stem(path)) if suffix(path) in FRAME_SUFFIXES else None
            clips.setdefault(match["video"] if match else stem(path), []).append(path)
        return clips

    def segment_files(self, paths: list[Path], output_dir: Path, support: VideoSupport) -> list[str]:
        images = [read_image(p, self.loader) for p in sorted(paths, key=_frame_number)]
        if len(images) == 1 and images[0].dim() == 4:  # a volume: its slices are the frames
            frames = as_slices(images[0], self.axis)
        elif all(i.dim() == 3 for i in images):
            frames = torch.cat([as_slices(i, self.axis) for i in images])
        else:
            raise ValueError("a clip is one 3D volume or 2D frames, not a mix")
        start = round(self.start_fraction * (len(frames) - 1))
        label = label_clip(self.model, frames, support, self.support.label_ids, start)  # (F, H, W)
        if images[0].dim() == 4:
            volume = label.movedim(0, self.axis)
            return [str(write_label(volume, images[0], output_dir, stem(paths[0]), label_suffix(paths[0], images[0])))]
        return [
            str(write_label(label[f].T, image, output_dir, stem(p), label_suffix(p, image)))
            for f, (p, image) in enumerate(zip(sorted(paths, key=_frame_number), images, strict=True))
        ]


def _frame_number(path: Path) -> int:
    match = FRAME.match(stem(path))
    return int(match["frame"]) if match else 0
