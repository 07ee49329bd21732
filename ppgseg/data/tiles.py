"""Native-resolution tiles of images larger than the encoder input: where they fall, and labelled samples cut into
them (support pairs and training samples are cut into the tiles the targets are segmented in, `inference.tiles`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .contract import Sample


def starts(size: int, tile: int, overlap: float) -> list[int]:
    """Top-left offsets of tiles of side ``tile`` covering ``size`` pixels with at least ``overlap`` (fraction)."""
    if tile <= 0 or not 0 <= overlap < 1:
        raise ValueError(f"tile must be > 0 and overlap in [0, 1), got tile={tile}, overlap={overlap}")
    if size <= tile:
        return [0]
    step = max(1, int(tile * (1 - overlap)))
    n = -(-(size - tile) // step) + 1  # ceil
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def boxes(h: int, w: int, tile: int, overlap: float) -> list[tuple[slice, slice]]:
    """The (rows, columns) of every tile of an (h, w) image: tiles of side min(tile, h or w), in raster order."""
    th, tw = min(tile, h), min(tile, w)
    return [(slice(y, y + th), slice(x, x + tw)) for y in starts(h, tile, overlap) for x in starts(w, tile, overlap)]


def tile_pairs(images: Tensor, masks: Tensor, tile: int, overlap: float = 0.25) -> tuple[Tensor, Tensor]:
    """(K, C, H, W) support images and (K, N, H, W) masks -> (K*T, C, t, t) and (K*T, N, t, t) native tiles
    (t = min(tile, H or W) per side)."""
    tiles = boxes(*images.shape[-2:], tile, overlap)
    return torch.cat([images[..., r, c] for r, c in tiles]), torch.cat([masks[..., r, c] for r, c in tiles])


def tile_samples(samples: Sequence[Sample], tile: int, overlap: float = 0.25) -> list[Sample]:
    """Each sample cut into native-resolution tiles; a tile's ``source`` keeps its study's (``…#tile:y,x``), so a
    support never comes from the target's own image."""
    return [
        Sample(s.image[:, r, c], s.label[r, c], f"{s.source}#tile:{r.start},{c.start}")
        for s in samples
        for r, c in boxes(*s.label.shape, tile, overlap)
    ]
