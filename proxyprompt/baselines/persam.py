"""PerSAM-style training-free personalisation (Zhang et al., "Personalize Segment Anything with One Shot"): a
prototype of the object from the support's features, a location prior from the target's similarity to it, and one
cascaded refinement. PerSAM is one-shot; with K support pairs the prototype is the mean over all of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, Pairs, Target, cell_centres, component_at, downsample, mask_box, valid_grid


def prototypes(support: Pairs) -> tuple[Tensor, Tensor]:
    """Unit-norm prototype per object: the mask-weighted mean of the support's unit-norm features.

    Returns:
        (N, C) prototypes and (N,) bool: whether any support pair shows the object.
    """
    feats = F.normalize(support.features.embed, dim=1)  # (K, C, h, w)
    weights = downsample(support.masks, feats.shape[-1])  # (K, N, h, w) area fractions
    total = torch.einsum("kchw,knhw->nc", feats, weights)
    mass = weights.sum(dim=(0, 2, 3))
    return F.normalize(total, dim=1), mass > 0


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
    similarity map as mask prompt; then one cascaded pass: the same points, the first mask's box and its logits."""

    name = "PerSAM-style (training-free)"

    def set_support(self, support: Pairs) -> None:
        self.protos, self.shown = prototypes(support)

    @torch.no_grad()
    def predict(self, target: Target, seed: int = 0) -> Tensor:
        bb = self.backbone
        sim = similarity(target, self.protos)  # (N, h, w)
        side, low_side = sim.shape[-1], bb.prompt_encoder.mask_input_size[0]
        valid = valid_grid(target.geo, bb.img_size, side)
        prior = unit_range(sim, valid)  # (N, h, w) in [0, 1]
        out = self.empty(target)
        for i in torch.nonzero(self.shown).flatten().tolist():
            pos = int(prior[i].masked_fill(~valid, -1).argmax())
            neg = int(prior[i].masked_fill(~valid, 2).argmin())
            points = (cell_centres(torch.tensor([pos, neg]), side, bb.img_size), torch.tensor([1, 0]))
            # where points cannot be given: the box of the high-similarity region around the most similar cell
            region = component_at(prior[i] > 0.5, pos)
            fallback = mask_box(region.float()) * (bb.img_size / side)
            mask = 20 * (F.interpolate(prior[i][None, None], size=(low_side, low_side), mode="bilinear")[0, 0] - 0.5)
            low = self.prompt(target, points=points, mask=mask, fallback_box=fallback)
            box = mask_box((low > 0).float())
            if box is not None:  # cascaded refinement: the same points, the first mask's box and logits
                low = self.prompt(target, points=points, box=box * (bb.img_size / low.shape[-1]), mask=low)
            out[:, i] = self.to_original(low[None], target)[:, 0]
        return out
