"""Contextual Colorization Module (CCM): dual-reverse cross-attention (paper Sec. 3.2, Eq. 8-11).

Each of the 4 blocks first halves the token count of both streams with a learnable projection, then
    F_x'      = Add&Norm(CrossAttn(F_x <- E_ctx))           (Eq. 8)
    F_x_next  = Add&Norm(FFN(F_x'))                         (Eq. 9)
    E_ctx'    = Add&Norm(CrossAttn(E_ctx <- F_x_next))      (Eq. 10, the reversed direction)
    E_ctx_next= Add&Norm(FFN(E_ctx'))                       (Eq. 11)
After 4 blocks the context tokens (H*W/16 of them) are the proxy prompt P.

The learnable projection is a strided 2x1 (then 1x2) convolution over the token grid: it halves the tokens as the
paper asks, keeps their 2-D layout, and has the same C*C*2 weights whatever the image size (a dense H*W -> H*W/2
linear map would hold millions of weights per block and fix the grid size).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class TokenHalving(nn.Module):
    """Learnable projection from an (h, w) token grid to (h/2, w) or (h, w/2)."""

    def __init__(self, dim: int, along_height: bool) -> None:
        super().__init__()
        kernel = (2, 1) if along_height else (1, 2)
        self.along_height = along_height
        self.proj = nn.Conv2d(dim, dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """(B, h*w, C) -> (B, h*w/2, C)."""
        h, w = hw
        grid = x.transpose(1, 2).unflatten(2, (h, w))  # (B, h*w, C) -> (B, C, h, w)
        grid = self.proj(grid)  # (B, C, h', w')
        return grid.flatten(2).transpose(1, 2), (grid.shape[-2], grid.shape[-1])


class _AddNormAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        return self.norm(query + self.attn(query, context, context, need_weights=False)[0])


class _AddNormFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.ffn(x))


class DualReverseBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, along_height: bool) -> None:
        super().__init__()
        self.halve_x = TokenHalving(dim, along_height)
        self.halve_ctx = TokenHalving(dim, along_height)
        self.x_from_ctx = _AddNormAttention(dim, heads)
        self.x_ffn = _AddNormFFN(dim, ffn_dim)
        self.ctx_from_x = _AddNormAttention(dim, heads)
        self.ctx_ffn = _AddNormFFN(dim, ffn_dim)

    def forward(self, f_x: Tensor, ctx: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """f_x, ctx: (B, h*w, C) -> both (B, h*w/2, C), and the new grid."""
        f_x, new_hw = self.halve_x(f_x, hw)
        ctx, _ = self.halve_ctx(ctx, hw)
        f_x = self.x_ffn(self.x_from_ctx(f_x, ctx))  # Eq. 8-9
        ctx = self.ctx_ffn(self.ctx_from_x(ctx, f_x))  # Eq. 10-11
        return f_x, ctx, new_hw


class ContextualColorization(nn.Module):
    """CCM: 4 dual-reverse blocks; returns the proxy prompt P."""

    def __init__(self, dim: int, *, depth: int = 4, heads: int = 8, ffn_dim: int = 1024) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [DualReverseBlock(dim, heads, ffn_dim, along_height=i % 2 == 0) for i in range(depth)]
        )
        self.reduction = 2**depth

    def forward(self, f_x: Tensor, ctx: Tensor, hw: tuple[int, int]) -> Tensor:
        """Colorize.

        Args:
            f_x: (B, N, HW, C) target features, duplicated per object.
            ctx: (B, N, HW, C) contextual embedding E_ctx.
            hw: the (H, W) token grid.
        Returns:
            P: (B, N, HW/16, C) for depth 4.
        """
        b, n = ctx.shape[:2]
        f_x, ctx = f_x.flatten(0, 1), ctx.flatten(0, 1)  # (B*N, HW, C)
        for block in self.blocks:
            f_x, ctx, hw = block(f_x, ctx, hw)
        return ctx.unflatten(0, (b, n))


class PooledContext(nn.Module):
    """Ablation "without CCM": P is E_ctx average-pooled 4x4 (same H*W/16 tokens), no cross-attention."""

    reduction = 16

    def forward(self, f_x: Tensor, ctx: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, _, c = ctx.shape
        grid = ctx.flatten(0, 1).transpose(1, 2).unflatten(2, hw)  # (B*N, HW, C) -> (B*N, C, H, W)
        pooled = F.avg_pool2d(grid, 4)  # (B*N, C, H/4, W/4)
        return pooled.flatten(2).transpose(1, 2).unflatten(0, (b, n))  # -> (B, N, HW/16, C)
