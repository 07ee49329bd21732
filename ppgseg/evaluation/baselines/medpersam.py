"""Med-PerSAM-style one-shot prompting (Yoon et al.): the support mask warped onto the target by deformable
registration is the mask prompt; box and point prompts are extracted from it, and prompts and prediction are refined
iteratively. Training-free for the backbone; the registration is optimised per support/target pair
(`PairRegistration`) instead of Med-PerSAM's learned warping network. With K support pairs the warped masks of the
pairs showing an object are averaged (multi-atlas fusion)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...backbones.base import Backbone, mask_box
from .base import Method, Pairs, Target, cell_centres, downsample
from .persam import prototypes, similarity
from .registration import PairRegistration


def ring_and_core(region: Tensor) -> tuple[Tensor, Tensor]:
    """(h, w) bool region -> (eroded core, ring = dilated minus region), by 3x3 max-pooling. A region too thin to
    survive erosion is its own core."""
    r = region.float()[None, None]
    dilated = F.max_pool2d(r, 3, 1, 1)[0, 0] > 0
    core = -F.max_pool2d(-r, 3, 1, 1)[0, 0] > 0
    return (core if core.any() else region), dilated & ~region


def spread_points(score: Tensor, region: Tensor, highest: bool) -> Tensor:
    """Flat indices of one point per quadrant of ``region`` (about its centroid): the cell of the highest (or
    lowest) ``score`` in each, so that points do not cluster (Med-PerSAM's sub-regions)."""
    side = score.shape[-1]
    ys, xs = torch.nonzero(region, as_tuple=True)
    if len(ys) == 0:
        return torch.empty(0, dtype=torch.long)
    cy, cx = ys.float().mean(), xs.float().mean()
    out = []
    for top in (True, False):
        for left in (True, False):
            sel = ((ys < cy) == top) & ((xs < cx) == left)
            if sel.any():
                cells = ys[sel] * side + xs[sel]
                s = score.flatten()[cells]
                out.append(cells[s.argmax() if highest else s.argmin()])
    return torch.stack(out)


class MedPerSAM(Method):
    """Warped support masks as mask prompt, a box and spread positive/negative points from them, ``iterations``
    refinements in which the last prediction gives the next prompts.

    Args:
        backbone: the frozen backbone.
        iterations: decoder passes (the first from the warped masks, the others refinements).
        registration: the pairwise registration (default settings if None).
    """

    name = "Med-PerSAM-style (registration)"

    def __init__(self, backbone: Backbone, *, iterations: int = 3, registration: PairRegistration | None = None):
        super().__init__(backbone)
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.iterations = iterations
        self.registration = registration or PairRegistration()

    def set_support(self, support: Pairs) -> None:
        self.support = support
        self.protos = prototypes(support)

    def warped_masks(self, target: Target) -> Tensor:
        """(N, S, S) support masks registered onto the target, averaged over the pairs showing each object."""
        s = self.support
        total = torch.zeros_like(s.masks[0])
        count = torch.zeros(s.masks.shape[1])
        for k in range(len(s)):
            ddf = self.registration(s.x[k : k + 1], target.x)
            total += self.registration.apply(s.masks[k : k + 1], ddf)[0]
            count += s.masks[k].flatten(1).amax(1) > 0
        return total / count.clamp_min(1)[:, None, None]

    @torch.no_grad()
    def predict(self, target: Target, seed: int = 0) -> Tensor:
        bb = self.backbone
        warped = self.warped_masks(target)  # (N, S, S) in [0, 1]
        sim = similarity(target, self.protos.fg)  # (N, h, w)
        side = sim.shape[-1]
        low_side = bb.prompt_encoder.mask_input_size[0]
        low = torch.logit(
            F.interpolate(warped[None], size=(low_side, low_side), mode="bilinear")[0].clamp(1e-4, 1 - 1e-4)
        )
        low = low.clamp(-10, 10)  # the warped masks as a previous prediction's logits
        for _ in range(self.iterations):
            regions = downsample((low > 0).float(), side) > 0.5  # (N, h, w)
            low = torch.stack([self.refine(target, low[i], regions[i], sim[i]) for i in range(len(low))])
        out = self.to_original(low, target)
        out[:, ~self.protos.shown] = self.empty(target)[:, ~self.protos.shown]
        return out

    def refine(self, target: Target, low: Tensor, region: Tensor, sim: Tensor) -> Tensor:
        """One object, one pass: (h4, w4) previous logits, (h, w) region and similarity -> (h4, w4) new logits."""
        bb = self.backbone
        box = mask_box((low > 0).float())
        if box is None:
            return low
        core, ring = ring_and_core(region)
        pos, neg = spread_points(sim, core, highest=True), spread_points(sim, ring, highest=False)
        coords = cell_centres(torch.cat([pos, neg]), sim.shape[-1], bb.img_size)  # (P, 2) xy
        labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        points = (coords, labels) if len(coords) else None
        return self.prompt(target, points=points, box=box * (bb.img_size / low.shape[-1]), mask=low)
