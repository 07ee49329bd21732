"""What the bundle's video configs build: clips of a split as a dataset, the support set in video mode, and the
evaluator that propagates every clip from it (train_video.json's validation)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator
from torch import Tensor
from torch.utils.data import Dataset

from .data.episodes import to_byte_range
from .data.video import Clip, load_clips
from .modeling.proxy_sam2_video import ProxyPromptVideo, VideoSupport
from .workflows import SupportSet


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


def video_support(model: ProxyPromptVideo, support: SupportSet) -> VideoSupport:
    """A data-contract support set (frames of other clips) as SAM 2 conditioning memories + the PPG embedding."""
    images = torch.stack([to_byte_range(s.image) for s in support.samples])
    masks = torch.stack([s.masks(support.label_ids) for s in support.samples])
    x, m = model.prepare_support(images, masks)
    return model.video_support(x, m)


def segment_clip(model: ProxyPromptVideo, frames: Tensor, support: VideoSupport, start: int = 0) -> Tensor:
    """(F, C, H, W) frames as loaded -> (F, N, H, W) logits at their size, propagated both ways from ``start``."""
    x, geo = model.backbone.preprocess(frames)
    low = model.segment_video(model.encode_frames(x), {start: support})
    return model.backbone.postprocess(torch.stack(low), geo)


class VideoEvaluator(SupervisedEvaluator):
    """Propagates every clip of ``val_data_loader`` from one support set (frames of other subjects), encoded once per
    run with the weights of that moment. Outputs per clip: pred and label (F, N, H, W) binary, source."""

    def __init__(self, *, network: ProxyPromptVideo, support: SupportSet, **kwargs) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(network=network, **kwargs)
        self.support = support
        self.add_event_handler(Events.EPOCH_STARTED, self._encode_support)

    def _encode_support(self, engine: Engine) -> None:
        self.network.eval()
        with torch.no_grad():
            engine.state.support = video_support(self.network, self.support)

    def _iteration(self, engine: Engine, batchdata: dict) -> dict:
        with torch.no_grad():
            logits = segment_clip(self.network, batchdata["image"].to(engine.state.device), engine.state.support)
        return {"pred": (logits > 0).float().cpu(), "label": batchdata["label"], "source": batchdata["source"]}
