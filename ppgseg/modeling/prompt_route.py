"""Prompt routes: how the PPG's output reaches the frozen mask decoder.

The PPG gives two things per object: the proxy prompt P (B, N, T, C) and the support masks carried to the target by
the Selective map (B, N, g, g). A route decides which of them the decoder sees, and where:

- ``paper``: P alone, as Eq. 12 (Output = Decoder(F_x, P)). P enters SAM's sparse slot, where points and boxes go:
  the decoder's two-way transformer reads token prompts (and its LoRA adapts), each token gets SAM's positional
  encoding of its cell on P's (H/4, W/4) grid, and the slot is the same in SAM, LiteMedSAM and SAM 2. The dense slot
  keeps SAM's ``no_mask_embed``.
- ``paper_dense``: P alone, laid out on its (H/4, W/4) grid and upsampled into SAM's dense slot (added to every
  image-embedding position); no sparse token.
- ``transfer``: P in the sparse slot and the carried masks through SAM's own mask-prompt encoder in the dense slot.
- ``mask``: the carried masks alone (P unused): the parameter-free label transfer read by the decoder (ablation).
- ``coarse``: the carried masks upsampled as the output, with no decoder at all (ablation; nothing trains).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone, Features


class PromptRoute(nn.Module):
    """Base: (features, P, carried masks) -> the decoder's (B, N, 4H, 4W) low-res logits (and IoU (B, N))."""

    name: str
    uses_decoder = True

    def forward(
        self, backbone: Backbone, features: Features, tokens: Tensor, coarse: Tensor, *, with_iou: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Decode.

        Args:
            features: the targets' backbone features, batch B.
            tokens: (B, N, T, C) the proxy prompt P.
            coarse: (B, N, g, g) support masks carried to the targets (area fractions in [0, 1]).
        """
        raise NotImplementedError


def _positioned(backbone: Backbone, tokens: Tensor) -> Tensor:
    return tokens + backbone.token_pe(round(tokens.shape[2] ** 0.5))  # (B, N, T, C) + (T, C) cell positions


class SparseP(PromptRoute):
    name = "paper"

    def forward(self, backbone, features, tokens, coarse, *, with_iou=False):
        return backbone.decode(features, _positioned(backbone, tokens), None, with_iou=with_iou)


class DenseP(PromptRoute):
    name = "paper_dense"

    def forward(self, backbone, features, tokens, coarse, *, with_iou=False):
        b, n, t, c = tokens.shape
        side = round(t**0.5)
        grid = tokens.transpose(2, 3).unflatten(3, (side, side)).flatten(0, 1)  # (B, N, T, C) -> (B*N, C, s, s)
        size = (backbone.feat_size, backbone.feat_size)
        dense = F.interpolate(grid, size=size, mode="bilinear", align_corners=False).unflatten(0, (b, n))
        return backbone.decode(features, tokens.new_zeros(b, n, 0, c), dense, with_iou=with_iou)


class Transfer(PromptRoute):
    name = "transfer"

    def forward(self, backbone, features, tokens, coarse, *, with_iou=False):
        dense = backbone.embed_mask(coarse)
        return backbone.decode(features, _positioned(backbone, tokens), dense, with_iou=with_iou)


class MaskOnly(PromptRoute):
    name = "mask"

    def forward(self, backbone, features, tokens, coarse, *, with_iou=False):
        b, n, _, c = tokens.shape
        return backbone.decode(features, tokens.new_zeros(b, n, 0, c), backbone.embed_mask(coarse), with_iou=with_iou)


class CoarseOnly(PromptRoute):
    """The carried masks as logits (+-10 at certain fore/background, 0 at a half-covered cell), no decoder."""

    name = "coarse"
    uses_decoder = False

    def forward(self, backbone, features, tokens, coarse, *, with_iou=False):
        side = 4 * backbone.feat_size
        logits = 20 * (F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False) - 0.5)
        return (logits, torch.ones(coarse.shape[:2], device=coarse.device)) if with_iou else logits


# routes in which P alone reaches the decoder: their PPG adds the carried masks to E_ctx (`MaskContext`)
P_ONLY_ROUTES = ("paper", "paper_dense")

ROUTES: dict[str, type[PromptRoute]] = {r.name: r for r in (SparseP, DenseP, Transfer, MaskOnly, CoarseOnly)}


def build_route(name: str) -> PromptRoute:
    if name not in ROUTES:
        raise ValueError(f"prompt must be one of {sorted(ROUTES)}, got {name!r}")
    return ROUTES[name]()
