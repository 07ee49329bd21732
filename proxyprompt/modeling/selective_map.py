"""Selective map: the third (target-relevance) selection step of the CSM (paper Sec. 3.1, Eq. 6-7).

    Selective = (2 F_sup^T F_x - ||F_sup||^2) / sqrt(C),     E_ctx = A_agg . softmax(Selective)

with the softmax over the K*H*W support positions for each target position. This is attention with query F_x,
key F_sup and value A_agg, and is computed as one: with q' = [2 F_x, 1] and k' = [F_sup, -||F_sup||^2] the logits
q'.k' / sqrt(C) are exactly Eq. 6, so ``scaled_dot_product_attention`` evaluates Eq. 7 without materialising the
(K*H*W) x (H*W) map. (Up to the per-query constant -||F_x||^2, which softmax ignores, the logits are the negative
squared distance: each target patch reads the support patches that look like it.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SelectiveMap(nn.Module):
    def forward(self, f_x: Tensor, f_sup: Tensor, a_agg: Tensor) -> Tensor:
        """Contextual embedding for every target.

        Args:
            f_x: (B, HW, C) target features.
            f_sup: (KHW, C) support features.
            a_agg: (N, KHW, C) aggregated support tokens.
        Returns:
            E_ctx: (B, N, HW, C).
        """
        b, _, c = f_x.shape
        n = a_agg.shape[0]
        q = torch.cat([2 * f_x, torch.ones_like(f_x[..., :1])], dim=-1)  # (B, HW, C+1)
        k = torch.cat([f_sup, -f_sup.pow(2).sum(-1, keepdim=True)], dim=-1)  # (KHW, C+1)
        v = a_agg.permute(1, 0, 2).flatten(1)  # (N, KHW, C) -> (KHW, N*C): one attention map serves all objects
        out = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.expand(b, 1, -1, -1), v.expand(b, 1, -1, -1), scale=1 / math.sqrt(c)
        )  # (B, 1, HW, N*C)
        return out.squeeze(1).unflatten(-1, (n, c)).transpose(1, 2)  # (B, HW, N, C) -> (B, N, HW, C)


class MeanContext(nn.Module):
    """Ablation "without CSM selection": no target relevance; E_ctx is A_agg averaged over the K support pairs."""

    def forward(self, f_x: Tensor, f_sup: Tensor, a_agg: Tensor) -> Tensor:
        b, hw = f_x.shape[:2]
        n, khw, c = a_agg.shape
        ctx = a_agg.view(n, khw // hw, hw, c).mean(dim=1)  # (N, K, HW, C) -> (N, HW, C)
        return ctx.unsqueeze(0).expand(b, -1, -1, -1)
