"""Few-shot evaluators on MONAI's `SupervisedEvaluator`: every target of a split segmented from one support set,
encoded once per run with the weights of that moment (image by image, or clip by clip in video mode)."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator
from torch import Tensor

from ..inference.support import SupportSet
from ..inference.tiles import support_tile
from ..inference.video import segment_clip, video_support
from ..modeling.proxy_sam import ProxyPromptSAM
from ..modeling.proxy_sam2_video import VideoSupport


class FewShotEvaluator(SupervisedEvaluator):
    """Segments every target of ``val_data_loader`` from one support set, encoded once per run with the weights of
    that moment. Outputs per target: image, pred and label (1, N, H, W) binary, source. The ``inferer`` runs the
    model on each target (`NativeTileInferer`: native-resolution tiles, the support cut into the same tiles)."""

    def __init__(self, *, network: ProxyPromptSAM, support: SupportSet, **kwargs) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(network=network, **kwargs)
        self.support = support
        self.add_event_handler(Events.EPOCH_STARTED, self._encode_support)

    def _encode_support(self, engine: Engine) -> None:
        self.network.eval()
        with torch.no_grad():
            engine.state.support = self.encode_support()

    def encode_support(self):
        return self.support.encode(self.network, tile=support_tile(self.inferer))

    def segment(self, image: Tensor, support) -> Tensor:
        """(C, H, W) target -> (1, N, H, W) logits, through the evaluator's inferer."""
        return self.inferer(image[None], lambda x: self.network.segment(x, support))

    def _iteration(self, engine: Engine, batchdata: dict) -> dict:
        with torch.no_grad():
            logits = self.segment(batchdata["image"].to(engine.state.device), engine.state.support)
        label = batchdata["label"]
        return {
            "image": batchdata["image"],
            "pred": (logits > 0).float().cpu(),
            "label": label if label.dim() == logits.dim() else label[None],
            "source": batchdata["source"],
        }


class VideoEvaluator(FewShotEvaluator):
    """Propagates every clip of ``val_data_loader`` from one support set (frames of other subjects), encoded once per
    run with the weights of that moment. Outputs per clip: pred and label (F, N, H, W) binary, source."""

    def encode_support(self) -> VideoSupport:
        return video_support(self.network, self.support)

    def segment(self, image: Tensor, support: VideoSupport) -> Tensor:
        """(F, 3, H, W) clip -> (F, N, H, W) logits."""
        return segment_clip(self.network, image, support)
