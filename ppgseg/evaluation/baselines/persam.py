"""PerSAM-style training-free personalisation (Zhang et al., "Personalize Segment Anything with One Shot"): a
prototype of the object from the support's features, a location prior from the target's similarity to it, and one
cascaded refinement. PerSAM is one-shot; with K support pairs the prototype is the mean over all of them."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...backbones.base import mask_box
from .base import Method, Pairs, Target, cell_centres, component_at, downsample, valid_grid


class Prototypes(NamedTuple):
    """Per object: unit-norm mean support features inside (``fg``, (N, C)) and outside (``bg``) its masks, and
    ``shown`` (N,) whether any support pair shows it."""

    fg: Tensor
    bg: Tensor
    shown: Tensor


def prototypes(support: Pairs) -> Prototypes:
    """The mask-weighted means of the support's unit-norm features (PerSAM's target embedding), and of the rest."""
    feats = F.normalize(support.features.embed, dim=1)  # (K, C, h, w)
    inside = downsample(support.masks, feats.shape[-1])  # (K, N, h, w) area fractions

    def mean(weights: Tensor) -> Tensor:
        return F.normalize(torch.einsum("kchw,knhw->nc", feats, weights), dim=1)

    return Prototypes(mean(inside), mean(1 - inside), inside.sum(dim=(0, 2, 3)) > 0)


def similarity(target: Target, protos: Tensor) -> Tensor:
    """(N, C) unit prototypes -> (N, h, w) cosine similarity of the target's features to each."""
    feats = F.normalize(target.features.embed[0], dim=0)  # (C, h, w)
    return torch.einsum("chw,nc->nhw", feats, protos)


def unit_range(maps: Tensor, valid: Tensor) -> Tensor:
    """(N, h, w) maps -> min-max scaled to [0, 1] per map over the valid cells; 0 elsewhere."""
    lo = maps.masked_fill(~valid, float("inf")).flatten(1).amin(1)[:, None, None]
    hi = maps.masked_fill(~valid, float("-inf")).flatten(1).amax(1)[:, None, None]
    return ((maps - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1) * valid


class PerSAM(Method):
    """Positive point at the target location most similar to the prototype, negative at the least similar, the
    similarity map as mask prompt; then one cascaded pass: the same points, the first mask's box and its logits.

    On a backbone that takes no points the first pass gets a box instead: around the connected region of target cells
    closer to the object's prototype than to the support's background prototype, the one holding the cell where that
    margin is largest (no such cell: an empty mask).
    """

    name = "PerSAM-style (training-free)"

    def set_support(self, support: Pairs) -> None:
        self.protos = prototypes(support)

    @torch.no_grad()
    def predict(self, target: Target, seed: int = 0) -> Tensor:
        bb = self.backbone
        sim = similarity(target, self.protos.fg)  # (N, h, w)
        margin = sim - similarity(target, self.protos.bg)  # > 0: closer to the object than to the background
        side, low_side = sim.shape[-1], bb.prompt_encoder.mask_input_size[0]
        valid = valid_grid(target.geo, bb.img_size, side)
        prior = unit_range(sim, valid)  # (N, h, w) in [0, 1]
        out = self.empty(target)
        for i in torch.nonzero(self.protos.shown).flatten().tolist():
            pos = int(prior[i].masked_fill(~valid, -1).argmax())
            neg = int(prior[i].masked_fill(~valid, 2).argmin())
            points = (cell_centres(torch.tensor([pos, neg]), side, bb.img_size), torch.tensor([1, 0]))
            # the box that stands in for the points where they cannot go
            region = component_at((margin[i] > 0) & valid, int(margin[i].masked_fill(~valid, -2).argmax()))
            fallback = mask_box(region.float())
            fallback = None if fallback is None else fallback * (bb.img_size / side)
            mask = 20 * (F.interpolate(prior[i][None, None], size=(low_side, low_side), mode="bilinear")[0, 0] - 0.5)
            low = self.prompt(target, points=points, mask=mask, fallback_box=fallback)
            box = mask_box((low > 0).float())
            if box is not None:  # cascaded refinement: the same points, the first mask's box and logits
                low = self.prompt(target, points=points, box=box * (bb.img_size / low.shape[-1]), mask=low)
            out[:, i] = self.to_original(low[None], target)[:, 0]
        return out
