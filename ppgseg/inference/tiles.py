"""Images larger than the encoder input, at their own resolution: overlapping native-resolution tiles.

A 565-pixel fundus shrunk to LiteMedSAM's 256 pixels loses most vessels below one pixel. With ``tile`` set to the
encoder's input side, every tile is encoded without down-scaling:
- targets are segmented by MONAI's `sliding_window_inference` (Gaussian-weighted blending of the tiles' logits), with
  the support embedding computed once and shared by every tile;
- support pairs and training samples are cut into the same tiles (`data.tiles`), so that support and target are
  seen at the same scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.inferers import Inferer, sliding_window_inference
from torch import Tensor

from ..data.intensity import to_byte_range
from ..data.tiles import starts
from ..modeling.generator import SupportEmbedding
from ..modeling.proxy_sam import ProxyPromptSAM


class NativeTileInferer(Inferer):
    """A MONAI inferer: overlapping native-resolution tiles of side ``tile`` (MONAI's `sliding_window_inference`,
    Gaussian blending), each tile no larger than the image (so an image that fits one tile is one pass, unpadded).

    The images are brought to 8 bits once, so that every tile is scaled alike (a per-tile min-max of a CT slice would
    change the scale from tile to tile); ``network`` receives uint8 tiles. Its ``tile`` also tells the support set to
    cut its pairs into the same tiles (`SupportSet.encode`).
    """

    def __init__(self, tile: int, overlap: float = 0.25) -> None:
        super().__init__()
        starts(tile, tile, overlap)  # checks both
        self.tile, self.overlap = tile, overlap

    def __call__(self, inputs: Tensor, network: Callable[[Tensor], Tensor], *args, **kwargs) -> Tensor:
        """(B, 1 or 3, H, W) images as loaded -> what ``network`` gives per tile, blended: (B, N, H, W)."""
        x = torch.stack([to_byte_range(i) for i in inputs])  # (B, 3, H, W) in [0, 255]
        roi = (min(self.tile, x.shape[-2]), min(self.tile, x.shape[-1]))

        def predict(t: Tensor) -> Tensor:
            return network(t.round().clamp(0, 255).to(torch.uint8), *args, **kwargs)

        return sliding_window_inference(
            x, roi, sw_batch_size=1, predictor=predict, overlap=self.overlap, mode="gaussian"
        )


def support_tile(inferer: Inferer | None) -> int | None:
    """The tile side a support set must be cut into to match ``inferer`` (None: whole images)."""
    return getattr(inferer, "tile", None)


@torch.no_grad()
def segment_tiled(
    model: ProxyPromptSAM, images: Tensor, support: SupportEmbedding, *, tile: int, overlap: float = 0.25
) -> Tensor:
    """(B, 1 or 3, H, W) targets as loaded -> (B, N, H, W) logits, segmented in overlapping native tiles
    (`NativeTileInferer`) from a support embedding computed once."""
    return NativeTileInferer(tile, overlap)(images, lambda t: model.segment(t, support))
