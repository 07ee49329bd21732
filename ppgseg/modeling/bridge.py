"""Bridge Unit: the second (object-guided) selection step of the CSM (paper Sec. 3.1, Eq. 4-5).

    F_cat = concat(F_sup, V),   A_agg = ResBlock2(CBAM(ResBlock1(F_cat)))

How this differs from the paper, and why: the paper concatenates the N objects along channels
(F_cat is K x N(C_v + C) x H x W) so that CBAM's channel and spatial attention see all objects at once. That ties
every weight to one N: a model trained on disc + cup could not segment the disc alone. Here the ResBlocks are shared
across objects (each object is a batch entry) and CBAM keeps the inter-object communication through symmetric
pooling over objects: each object's channel descriptor is concatenated with the mean (avg branch) / max (max
branch) of all objects' descriptors before the shared MLP, and each object's spatial map is concatenated with the
mean / max maps over all objects before the 7x7 conv. Pooling over objects is permutation invariant and defined for
any N >= 1, so one set of weights serves 1, 2, 3, 4, ... objects, and an object's attention still depends on
what the other objects are. A_agg's tokens are layer-normalised on the way out: the ReLU-ended ResBlocks leave
large non-negative activations that would saturate the CCM's attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm (batches are a handful of support pairs), 1x1 projection on the skip."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            _norm(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            _norm(out_ch),
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.skip(x))


class CrossObjectCBAM(nn.Module):
    """CBAM (Woo et al. 2018) whose channel and spatial attention also read the other objects, for any N."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(nn.Linear(2 * channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = nn.Conv2d(4, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        """(K, N, C, H, W) -> (K, N, C, H, W)."""
        avg = x.mean(dim=(-2, -1))  # (K, N, C)
        mx = x.amax(dim=(-2, -1))  # (K, N, C)
        avg_desc = torch.cat([avg, avg.mean(dim=1, keepdim=True).expand_as(avg)], dim=-1)  # (K, N, 2C)
        max_desc = torch.cat([mx, mx.amax(dim=1, keepdim=True).expand_as(mx)], dim=-1)  # (K, N, 2C)
        x = x * torch.sigmoid(self.mlp(avg_desc) + self.mlp(max_desc))[..., None, None]

        s_avg, s_max = x.mean(dim=2), x.amax(dim=2)  # (K, N, H, W)
        maps = torch.stack(
            [
                s_avg,
                s_max,
                s_avg.mean(dim=1, keepdim=True).expand_as(s_avg),
                s_max.amax(dim=1, keepdim=True).expand_as(s_max),
            ],
            dim=2,
        )  # (K, N, 4, H, W)
        k, n = maps.shape[:2]
        att = torch.sigmoid(self.spatial(maps.flatten(0, 1))).unflatten(0, (k, n))  # (K, N, 1, H, W)
        return x * att


class BridgeUnit(nn.Module):
    """Fuses the backbone's support features with the Vim features of each object into A_agg."""

    def __init__(self, feat_dim: int, vim_dim: int) -> None:
        super().__init__()
        self.res1 = ResBlock(feat_dim + vim_dim, feat_dim)
        self.cbam = CrossObjectCBAM(feat_dim)
        self.res2 = ResBlock(feat_dim, feat_dim)
        self.out_norm = nn.LayerNorm(feat_dim)  # tokens at the scale of the standardised target features

    def forward(self, f_sup: Tensor, v: Tensor) -> Tensor:
        """Aggregate support features per object.

        Args:
            f_sup: (K, C, H, W) frozen-encoder features of the support images.
            v: (K, N, C_v, H, W) Vision Mamba features of each (image, object mask) pair.
        Returns:
            A_agg: (N, K*H*W, C) tokens.
        """
        k, n = v.shape[:2]
        f_cat = torch.cat([f_sup.unsqueeze(1).expand(-1, n, -1, -1, -1), v], dim=2)  # (K, N, C + C_v, H, W)
        a = self.res1(f_cat.flatten(0, 1)).unflatten(0, (k, n))  # (K, N, C, H, W)
        a = self.res2(self.cbam(a).flatten(0, 1)).unflatten(0, (k, n))  # (K, N, C, H, W)
        return self.out_norm(a.permute(1, 0, 3, 4, 2).flatten(1, 3))  # (K, N, C, H, W) -> (N, K*H*W, C)
