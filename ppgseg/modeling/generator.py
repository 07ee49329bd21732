"""Proxy Prompt Generator (PPG): CSM (Vision Mamba -> Bridge Unit -> Selective map) then CCM (paper Sec. 3, Fig. 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .bridge import BridgeUnit
from .vision_mamba import VisionMambaEncoder


class ProxyPrompt(NamedTuple):
    """tokens: (B, N, T, C) the proxy prompt P.  coarse_mask: (B, N, H, W) support masks read through Eq. 7."""

    tokens: Tensor
    coarse_mask: Tensor


class Selected(NamedTuple):
    """The Selective map's reading of B targets, before the CCM: f_x (B, HW, C) the standardised target features,
    ctx (B, N, HW, C) E_ctx, coarse (B, N, H, W) the support masks carried to each target."""

    f_x: Tensor
    ctx: Tensor
    coarse: Tensor

    @staticmethod
    def cat(parts: list[Selected]) -> Selected:
        """Several batches' readings as one batch."""
        return Selected(*(torch.cat(level) for level in zip(*parts, strict=True)))

    def rows(self, index: list[int] | slice) -> Selected:
        """The reading of some of the B targets."""
        return Selected(self.f_x[index], self.ctx[index], self.coarse[index])

    def carried(self, min_carried: float) -> Tensor:
        """(B, N) True where object n's carried mask reaches ``min_carried`` somewhere on target b (all at 0)."""
        peak = self.coarse.flatten(2).amax(2)
        return peak >= min_carried if min_carried > 0 else torch.ones_like(peak, dtype=torch.bool)


@dataclass(frozen=True)
class SupportEmbedding:
    """What the PPG keeps of a support set; computed once, reused for every target.

    Attributes:
        keys: (K*H*W, C) frozen-encoder features of the support images on the PPG grid (Selective-map keys).
        a_agg: (N, K*H*W, C) Bridge-Unit output (Selective-map values).
        masks: (N, K*H*W) the support masks on the PPG grid (area fractions), carried along by the Selective map.
    """

    keys: Tensor
    a_agg: Tensor
    masks: Tensor

    @property
    def num_objects(self) -> int:
        return self.a_agg.shape[0]


class ProxyPromptGenerator(nn.Module):
    """Turns a support set and a target's features into N proxy prompts.

    Args:
        context_encoder: Vision Mamba encoder of concat(image, mask) (first selection step).
        bridge: Bridge Unit (second selection step).
        selector: Selective map, or `MeanContext` for the "without CSM selection" ablation (third step).
        colorizer: CCM, or `PooledContext` for the "without CCM" ablation.
        grid: side of the token grid the PPG works on.
        mask_context: adds the support masks carried to each target position (read by the same Selective map) to
            E_ctx before the CCM (`MaskContext`), so that which object is asked for is explicit in P; None leaves
            E_ctx as Eq. 7 gives it.
    """

    def __init__(
        self,
        *,
        context_encoder: VisionMambaEncoder,
        bridge: BridgeUnit,
        selector: nn.Module,
        colorizer: nn.Module,
        grid: int,
        mask_context: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if grid % 4:
            raise ValueError(f"PPG grid {grid} must be a multiple of 4 (the CCM halves the tokens 4 times)")
        self.context_encoder, self.bridge = context_encoder, bridge
        self.selector, self.colorizer = selector, colorizer
        self.grid = grid
        self.mask_context = mask_context
        self.standardize = _Standardize()

    def encode_support(self, images: Tensor, masks: Tensor, features: Tensor) -> SupportEmbedding:
        """Encode a support set.

        Args:
            images: (K, 3, S, S) support images as the backbone's encoder takes them (normalised, padded).
            masks: (K, N, S, S) binary masks in the same frame.
            features: (K, C, H, W) frozen-encoder features of ``images`` on the PPG grid.
        """
        k, n = masks.shape[:2]
        features = self.standardize(features)
        pairs = torch.cat([images.unsqueeze(1).expand(-1, n, -1, -1, -1), masks.unsqueeze(2)], dim=2)  # (K,N,4,S,S)
        v = self.context_encoder(pairs.flatten(0, 1)).unflatten(0, (k, n))  # (K, N, C_v, H, W)
        a_agg = self.bridge(features, v)  # (N, K*H*W, C)
        keys = features.permute(0, 2, 3, 1).flatten(0, 2)  # (K, C, H, W) -> (K*H*W, C)
        on_grid = nn.functional.adaptive_avg_pool2d(masks, self.grid)  # (K, N, H, W)
        return SupportEmbedding(keys=keys, a_agg=a_agg, masks=on_grid.permute(1, 0, 2, 3).flatten(1))

    def forward(self, target: Tensor, support: SupportEmbedding) -> ProxyPrompt:
        """Proxy prompts for each object.

        Args:
            target: (B, C, H, W) frozen-encoder features of the targets on the PPG grid.
            support: see `encode_support`.
        Returns:
            tokens (B, N, T, C), T = H*W/16, and the support masks carried to the target (B, N, H, W).
        """
        selected = self.select(target, support)
        return ProxyPrompt(self.colorize(selected), selected.coarse)

    def select(self, target: Tensor, support: SupportEmbedding) -> Selected:
        """The CSM's Selective map on B targets (the first half of `forward`): E_ctx and the carried masks."""
        target = self.standardize(target)
        b, c, h, w = target.shape
        if c != support.keys.shape[-1]:
            raise ValueError(f"target features have {c} channels, the support {support.keys.shape[-1]}")
        n = support.num_objects
        f_x = target.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        values = torch.cat([support.a_agg.permute(1, 0, 2).flatten(1), support.masks.T], dim=1)  # (KHW, N*C + N)
        selected = self.selector(f_x, support.keys, values)  # (B, HW, N*C + N): one attention map for all objects
        ctx = selected[..., : n * c].unflatten(-1, (n, c)).transpose(1, 2)  # E_ctx: (B, N, HW, C)
        carried = selected[..., n * c :].transpose(1, 2)  # (B, N, HW): support masks read at each target position
        if self.mask_context is not None:
            ctx = ctx + self.mask_context(carried)
        return Selected(f_x, ctx, carried.unflatten(-1, (h, w)))  # coarse: (B, N, H, W)

    def colorize(self, selected: Selected, pairs: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The CCM's proxy prompts P (B, N, T, C) from `select`'s reading; with ``pairs`` (target indices (M,), object
        indices (M,)) those pairs' only, (M, T, C). Each (target, object) pair is colorized on its own, so a pair's
        P does not depend on which others are asked."""
        f_x, ctx = selected.f_x, selected.ctx
        hw = tuple(selected.coarse.shape[-2:])
        if pairs is None:  # f_x duplicated N times (Sec. 3.2)
            return self.colorizer(f_x.unsqueeze(1).expand(-1, ctx.shape[1], -1, -1), ctx, hw)
        at, obj = pairs
        return self.colorizer(f_x[at].unsqueeze(1), ctx[at, obj].unsqueeze(1), hw)[:, 0]


class MaskContext(nn.Module):
    """The carried support masks as context: each target position's carried mask value m in [0, 1] becomes
    m * e_fg + (1 - m) * e_bg (two learned C-vectors), added to E_ctx. It gives P the object's identity directly
    (Eq. 7 carries it only inside A_agg's values, which the CCM must first learn to read)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(
            torch.randn(2, dim)
        )  # background, foreground: unit scale, as the standardised features

    def forward(self, carried: Tensor) -> Tensor:
        """(B, N, HW) carried mask values -> (B, N, HW, C)."""
        m = carried.unsqueeze(-1)
        return m * self.embed[1] + (1 - m) * self.embed[0]


class _Standardize(nn.Module):
    """Per-position layer norm without affine weights, applied to the frozen features before the CSM and CCM.

    Eq. 6 divides by sqrt(C), which assumes unit-variance channels; backbones differ (LiteMedSAM's features have a
    norm of ~1.5 over 256 channels, which would leave the softmax uniform and the Selective map blind). Standardising
    each position makes the temperature mean what the paper intends on every backbone.
    """

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return nn.functional.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)
