"""The backbone prompted by a human on every image (Table 1's "box" and "1-point" rows), simulated from the ground
truth: an upper reference for what the proxy prompt replaces."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Method, Target, input_scale, mask_box


class BoxPrompt(Method):
    """The ground-truth mask's bounding box, one per object and image."""

    name = "Box (GT box per image)"
    needs = "a box on every image"
    uses_support = False

    @torch.no_grad()
    def predict(self, target: Target, seed: int = 0) -> Tensor:
        boxes = [mask_box(m) for m in target.truth[0]]
        present = [i for i, b in enumerate(boxes) if b is not None]
        out = self.empty(target)
        if not present:
            return out
        scale = input_scale(target.geo).repeat(2)
        b = torch.stack([boxes[i] for i in present]) * scale  # (P, 4) in input pixels
        sparse, dense = self.backbone.prompt_encoder(points=None, boxes=b.to(self.backbone.device), masks=None)
        out[:, present] = self.to_original(self.decode(target, sparse, dense), target)
        return out


class OnePoint(Method):
    """One positive point drawn uniformly inside the ground-truth mask, one per object and image."""

    name = "1-point (random GT point per image)"
    needs = "a point on every image"
    uses_support = False

    @torch.no_grad()
    def predict(self, target: Target, seed: int = 0) -> Tensor:
        rng = np.random.default_rng(seed)
        out = self.empty(target)
        points, present = [], []
        for i, m in enumerate(target.truth[0]):
            ys, xs = torch.nonzero(m > 0.5, as_tuple=True)
            if len(ys):
                j = int(rng.integers(len(ys)))
                points.append(torch.stack([xs[j], ys[j]]).float() + 0.5)
                present.append(i)
        if not present:
            return out
        coords = (torch.stack(points) * input_scale(target.geo))[:, None]  # (P, 1, 2) xy in input pixels
        labels = torch.ones(len(present), 1, dtype=torch.int)
        sparse, dense = self.backbone.prompt_encoder(
            points=(coords.to(self.backbone.device), labels.to(self.backbone.device)), boxes=None, masks=None
        )
        out[:, present] = self.to_original(self.decode(target, sparse, dense), target)
        return out
