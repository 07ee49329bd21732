"""The backbone prompted by a human on every image (Table 1's "box" and "1-point" rows), simulated from the ground
truth: an upper reference for what the proxy prompt replaces. The prompt goes to the backbone as it is, whatever
prompts the backbone was trained with."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ...backbones.base import mask_box
from .base import Method, Target, input_scale


class HumanPrompt(Method):
    """One prompt per object present in the target, made from its ground-truth mask by ``prompts``."""

    uses_support = False

    def prompts(self, mask: Tensor, rng: np.random.Generator, scale: Tensor) -> dict:
        """(H0, W0) ground truth -> the prompt encoder's keyword arguments (coordinates times ``scale``, xy)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, target: Target, seed: int = 0) -> Tensor:
        rng, scale = np.random.default_rng(seed), input_scale(target.geo)
        out = self.empty(target)
        for i, mask in enumerate(target.truth[0]):
            if mask.max() > 0.5:
                sparse, dense = self.backbone.prompt_encoder(**self.prompts(mask, rng, scale), masks=None)
                out[:, i] = self.to_original(self.decode(target, sparse, dense), target)[:, 0]
        return out


class BoxPrompt(HumanPrompt):
    """The ground-truth mask's bounding box."""

    name = "Box (GT box per image)"
    needs = "a box on every image"

    def prompts(self, mask: Tensor, rng: np.random.Generator, scale: Tensor) -> dict:
        box = mask_box(mask) * scale.repeat(2)
        return {"points": None, "boxes": box[None].to(self.backbone.device)}


class OnePoint(HumanPrompt):
    """One positive point drawn uniformly inside the ground-truth mask."""

    name = "1-point (random GT point per image)"
    needs = "a point on every image"

    def prompts(self, mask: Tensor, rng: np.random.Generator, scale: Tensor) -> dict:
        ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
        j = int(rng.integers(len(ys)))
        xy = (torch.stack([xs[j], ys[j]]).float() + 0.5) * scale
        labels = torch.ones(1, 1, dtype=torch.int)
        return {"points": (xy[None, None].to(self.backbone.device), labels.to(self.backbone.device)), "boxes": None}
