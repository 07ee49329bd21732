"""The proxy prompt itself in the comparison's interface: a trained ProxyPromptSAM and a support set."""

from __future__ import annotations

import torch
from torch import Tensor

from ...modeling.proxy_sam import ProxyPromptSAM
from .base import Method, Pairs, Target


class ProxyPrompt(Method):
    """PPG + the frozen backbone (with its LoRA): one model for all objects, the support set as prompt. With
    ``box_refine`` each mask is refined by a second pass prompted with its own box (`refine_with_box`): still no
    input from the user on the target."""

    def __init__(self, model: ProxyPromptSAM, *, box_refine: bool = False) -> None:
        super().__init__(model.backbone)
        self.model, self.box_refine = model, box_refine
        self.name = "PPG + self-box" if box_refine else "PPG (proxy prompt)"

    def models_trained(self, num_objects: int) -> int:
        return 1

    def _features(self, pairs: Pairs | Target):
        # the comparison's features come from the plain backbone: valid here unless the encoder carries LoRA
        return self.model.encode_images(pairs.x) if self.model.encoder_trains else pairs.features

    @torch.no_grad()
    def set_support(self, support: Pairs) -> None:
        self.model.eval()
        self.support = self.model.encode_prepared_support(support.x, support.masks, self._features(support))

    @torch.no_grad()
    def predict(self, target: Target, seed: int = 0) -> Tensor:
        low = self.model.segment_features(self._features(target), self.support, box_refine=self.box_refine)
        return self.backbone.postprocess(low, target.geo)
