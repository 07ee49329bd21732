"""Generated two-object images: a bright disk (label 1) and a dark rounded square (label 2) on a textured
background. Subjects differ in position, size, contrast and noise, so one subject's masks are a real support for
another's. Deterministic for a given seed."""

from __future__ import annotations

import numpy as np
import torch

LABELS = {1: "disk", 2: "square"}


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.normal(size=(size // scale + 2, size // scale + 2))
    t = torch.from_numpy(coarse).float()[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()


def two_object_image(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One subject.

    Returns:
        image: (3, size, size) uint8.  label: (size, size) uint8 with 0 background, 1 disk, 2 square.
    """
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    label = np.zeros((size, size), np.uint8)
    r = rng.uniform(0.09, 0.16) * size
    half = rng.uniform(0.08, 0.14) * size
    margin = 0.2 * size
    while True:  # place the two objects apart
        c1 = rng.uniform(margin, size - margin, 2)
        c2 = rng.uniform(margin, size - margin, 2)
        if np.abs(c1 - c2).max() > r + half + 4:
            break
    disk = (yy - c1[0]) ** 2 + (xx - c1[1]) ** 2 <= r**2
    corner = 0.3 * half
    dy, dx = np.maximum(np.abs(yy - c2[0]) - (half - corner), 0), np.maximum(np.abs(xx - c2[1]) - (half - corner), 0)
    square = dy**2 + dx**2 <= corner**2
    label[square] = 2
    label[disk] = 1

    base = rng.uniform(90, 140)
    img = base + 12 * _smooth_noise(rng, size, 16)
    img = np.where(disk, base + rng.uniform(60, 100), img)
    img = np.where(square, base - rng.uniform(45, 75), img)
    img = img + rng.normal(0, rng.uniform(3, 10), size=img.shape)
    tint = rng.uniform(0.85, 1.15, size=3)[:, None, None]
    image = np.clip(img[None] * tint, 0, 255).astype(np.uint8)
    return image, label


def two_object_set(n: int, size: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` subjects: images (n, 3, size, size) uint8 and one-hot masks (n, 2, size, size) float (disk, square)."""
    rng = np.random.default_rng(seed)
    pairs = [two_object_image(rng, size) for _ in range(n)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
    masks = torch.stack([(labels == k).float() for k in LABELS], dim=1)
    return images, masks
