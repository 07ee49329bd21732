"""Vision Mamba context encoder: the first selection step of the Contextual Selective Module (paper Sec. 3.1, Eq. 1-3).

Follows Vim (Zhu et al. 2024): patch embedding, learned position embedding, L residual blocks of a bidirectional
Mamba mixer (a forward and a backward selective scan over the flattened patches, each with its own input-dependent
Δ, B, C), final norm. The input is concat(image, mask) -- 4 channels -- and the output V has C_v channels on the
backbone's feature grid. No class token: the PPG needs dense features, not an image label.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .selective_scan import selective_scan


class BiMambaMixer(nn.Module):
    """Mamba mixer with a forward and a backward scan sharing the in/out projections (Vim's bidirectional block)."""

    def __init__(self, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        inner = expand * dim
        self.inner, self.d_state = inner, d_state
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.directions = nn.ModuleList([_SSMBranch(inner, d_state, d_conv, self.dt_rank) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, dim) -> (B, L, dim)."""
        xz = self.in_proj(x).transpose(1, 2)  # (B, L, 2E) -> (B, 2E, L)
        u, z = xz.chunk(2, dim=1)  # (B, E, L) each
        y_fwd = self.directions[0](u, z)
        y_bwd = self.directions[1](u.flip(-1), z.flip(-1)).flip(-1)
        return self.out_proj(((y_fwd + y_bwd) / 2).transpose(1, 2))  # (B, E, L) -> (B, L, dim)


class _SSMBranch(nn.Module):
    """One scan direction: causal depthwise conv, input-dependent (Δ, B, C), selective scan, gate."""

    def __init__(self, inner: int, d_state: int, d_conv: int, dt_rank: int) -> None:
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner, bias=True)
        # Mamba's initialisation: dt in [1e-3, 1e-1] log-uniform via the softplus-inverse bias; S4D-real A.
        dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))

    def forward(self, u: Tensor, z: Tensor) -> Tensor:
        """u, z: (B, E, L) -> (B, E, L)."""
        length = u.shape[-1]
        u = F.silu(self.conv1d(u)[..., :length])  # causal: drop the right padding
        dbc = self.x_proj(u.transpose(1, 2))  # (B, L, R + 2N)
        dt, b, c = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # (B, L, R) -> (B, E, L); bias added in the scan
        return selective_scan(
            u,
            delta,
            -torch.exp(self.A_log.float()),
            b.transpose(1, 2).contiguous(),
            c.transpose(1, 2).contiguous(),
            self.D,
            z,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
        )


class VimBlock(nn.Module):
    def __init__(self, dim: int, **mixer_kwargs) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mixer(self.norm(x))


class VisionMambaEncoder(nn.Module):
    """Encodes (image, mask) pairs into V on the backbone's feature grid.

    Args:
        img_size: side of the backbone's (padded, square) input.
        grid: side of the output grid (the grid the PPG works on).
        patch: patch size; ``img_size // patch`` may be coarser than ``grid``, in which case V is upsampled
            bilinearly to ``grid`` (a speed option: fewer tokens to scan).
        dim: C_v, 192 in the paper (Vim-Tiny).
        depth: number of bidirectional blocks L (24 in Vim-Tiny).
    """

    def __init__(
        self,
        *,
        img_size: int,
        grid: int,
        patch: int,
        dim: int = 192,
        depth: int = 24,
        in_chans: int = 4,
        d_state: int = 16,
    ) -> None:
        super().__init__()
        if img_size % patch:
            raise ValueError(f"vim patch {patch} must divide the input size {img_size}")
        self.tokens_side = img_size // patch
        if self.tokens_side > grid or grid % self.tokens_side:
            raise ValueError(f"vim patch {patch} gives a {self.tokens_side}-grid; it must divide the PPG grid {grid}")
        self.grid, self.dim = grid, dim
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.tokens_side**2, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([VimBlock(dim, d_state=d_state) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 4, S, S) image+mask -> (B, C_v, grid, grid)."""
        t = self.patch_embed(x)  # (B, C_v, s, s)
        b, c, h, w = t.shape
        t = t.flatten(2).transpose(1, 2) + self.pos_embed  # (B, C_v, s, s) -> (B, s*s, C_v)
        for block in self.blocks:
            t = block(t)
        v = self.norm(t).transpose(1, 2).reshape(b, c, h, w)  # (B, s*s, C_v) -> (B, C_v, s, s)
        if h != self.grid:
            v = F.interpolate(v, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return v
