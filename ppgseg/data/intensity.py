"""Intensities as the models and the figures take them: any image brought to 8-bit range, and masks drawn over it."""

from __future__ import annotations

import numpy as np
from torch import Tensor

COLORS = np.array([[255, 60, 60], [60, 160, 255], [80, 220, 80], [250, 210, 40], [200, 80, 220]], np.float32)


def to_byte_range(image: Tensor) -> Tensor:
    """(C, H, W) as read -> float in [0, 255], 3 channels; values outside [0, 255] (CT in HU) are min-max scaled."""
    img = image.float()
    lo, hi = img.min(), img.max()
    if lo < 0 or hi > 255:
        img = (img - lo) / (hi - lo).clamp_min(1e-8) * 255
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]


def overlay(image: Tensor, masks: Tensor) -> np.ndarray:
    """(C, H, W) image in [0, 255], (N, H, W) binary masks -> (H, W, 3) uint8 with translucent coloured masks."""
    out = to_byte_range(image).permute(1, 2, 0).numpy().astype(np.float32).copy()
    for n, m in enumerate(masks.cpu().numpy().astype(bool)):
        out[m] = 0.5 * out[m] + 0.5 * COLORS[n % len(COLORS)]
    return out.clip(0, 255).astype(np.uint8)
