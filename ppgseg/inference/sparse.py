"""Sparse slice decoding: a volume's slices decoded where neighbouring decoded slices disagree, the rest
interpolated, from encoder features computed earlier."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from ..backbones.base import Features
from ..modeling.generator import Selected, SupportEmbedding
from ..modeling.proxy_sam import ProxyPromptSAM
from .policy import DecodePolicy

BACKGROUND = -20.0  # the logit of a pair that is not decoded


def sparse_slice_logits(
    model: ProxyPromptSAM,
    features: Features,
    embedding: SupportEmbedding,
    policy: DecodePolicy,
    *,
    positions: Sequence[int] | None = None,
) -> Tensor:
    """(Z, N, 4h, 4w) low-res logits (CPU) of a volume's Z slices from their encoder features, with fewer decodes.

    The PPG's Selective map runs on every slice; the model's `decode` (the CCM and the mask decoder, the costly parts)
    runs only for the (slice, object) pairs decoded: first every ``policy.z_stride``-th slice and the last. Then,
    object by object, each gap between two decoded slices is either filled or split: where the two masks agree
    (Dice >= ``policy.agree``, or both empty) the slices between get the logits interpolated linearly between the two
    ends; otherwise the middle slice is decoded and both halves are looked at again, down to neighbouring slices. An
    object the support carries to no part of a slice (``policy.min_carried``) is background there, as with every slice
    decoded. Each round's decodes are batched per slice. ``positions``: each row's slice index in the volume (default
    0..Z-1), which sets the interpolation weights where rows are not evenly spaced (slices left out in between).
    """
    z, chunk = features.embed.shape[0], policy.chunk
    pos = torch.arange(z, dtype=torch.float32) if positions is None else torch.tensor(positions, dtype=torch.float32)
    if len(pos) != z:
        raise ValueError(f"{len(pos)} positions for {z} slices")
    device = model.backbone.device
    selected = Selected.cat(
        [model.select(features.select(slice(s, s + chunk)).to(device), embedding) for s in range(0, z, chunk)]
    )
    keep = selected.carried(policy.min_carried).cpu()  # (Z, N)
    n, side = keep.shape[1], 4 * features.embed.shape[-1]
    logits = torch.full((z, n, side, side), BACKGROUND)

    def decode(asked: Tensor) -> None:  # (Z, N) bool: the pairs to decode now
        asked = asked & keep
        rows = asked.any(1).nonzero()[:, 0].tolist()
        for s in range(0, len(rows), chunk):
            at = rows[s : s + chunk]
            low, _ = model.decode(
                features.select(at).to(device), selected.rows(at), asked[at].to(device), box_refine=policy.box_refine
            )
            logits[at] = torch.where(asked[at][..., None, None], low.cpu(), logits[at])

    anchors = sorted({*range(0, z, policy.z_stride), z - 1})
    first = torch.zeros_like(keep)
    first[anchors] = True
    decode(first)
    gaps = [(a, b, o) for a, b in itertools.pairwise(anchors) if b - a > 1 for o in range(n)]
    while gaps:
        asked, split = torch.zeros_like(keep), []
        for a, b, o in gaps:
            if mask_dice(logits[a, o] > 0, logits[b, o] > 0) >= policy.agree:
                w = ((pos[a + 1 : b] - pos[a]) / (pos[b] - pos[a]))[:, None, None]
                logits[a + 1 : b, o] = torch.where(
                    keep[a + 1 : b, o, None, None], (1 - w) * logits[a, o] + w * logits[b, o], BACKGROUND
                )
            else:
                m = (a + b) // 2
                asked[m, o] = True
                split += [(a, m, o), (m, b, o)]
        decode(asked)
        gaps = [g for g in split if g[1] - g[0] > 1]
    return logits


def mask_dice(a: Tensor, b: Tensor) -> float:
    """Dice of two binary masks; 1 where both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total
