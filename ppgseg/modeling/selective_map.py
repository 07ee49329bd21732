"""Selective map: the third (target-relevance) selection step of the CSM (paper Sec. 3.1, Eq. 6-7).

    Selective = (2 F_sup^T F_x - ||F_sup||^2) / sqrt(C),     E_ctx = A_agg . softmax(Selective)

with the softmax over the K*H*W support positions for each target position. This is attention with query F_x,
key F_sup and value A_agg (the generator also attaches the support masks to the values, so one attention map
carries both to the target), and is computed as one: with q' = [2 F_x, 1] and k' = [F_sup, -||F_sup||^2] the logits
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
    def forward(self, f_x: Tensor, f_sup: Tensor, values: Tensor) -> Tensor:
        """Eq. 7 for any values attached to the support positions.

        Args:
            f_x: (B, HW, C) target features.
            f_sup: (KHW, C) support features.
            values: (KHW, D) what each support position carries (A_agg of every object, support masks).
        Returns:
            (B, HW, D).
        """
        b, _, c = f_x.shape
        q = torch.cat([2 * f_x, torch.ones_like(f_x[..., :1])], dim=-1)  # (B, HW, C+1)
        k = torch.cat([f_sup, -f_sup.pow(2).sum(-1, keepdim=True)], dim=-1)  # (KHW, C+1)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.expand(b, 1, -1, -1), values.expand(b, 1, -1, -1), scale=1 / math.sqrt(c)
        )  # (B, 1, HW, D)
        return out.squeeze(1)


class MeanContext(nn.Module):
    """Ablation "without CSM selection": no target relevance; each target position gets the values of the same
    position averaged over the K support pairs."""

    def forward(self, f_x: Tensor, f_sup: Tensor, values: Tensor) -> Tensor:
        b, hw = f_x.shape[:2]
        khw, d = values.shape
        return values.view(khw // hw, hw, d).mean(dim=0).unsqueeze(0).expand(b, -1, -1)  # (K, HW, D) -> (B, HW, D)
