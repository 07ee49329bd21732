"""How the service turns a support set and a study into a label map: image by image (slice by slice, with a decoding
policy and optional native tiles), or by SAM 2 propagation in video mode. A new way to segment is a new class with
these four members, passed to the service."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..backbones.base import Features
from ..data.contract import Sample
from ..data.tiles import tile_samples
from ..inference.policy import EVERY_SLICE, DecodePolicy
from ..inference.slices import as_slices, segment_image
from ..inference.support import encode_samples
from ..inference.tiles import NativeTileInferer
from ..inference.video import label_clip, video_support
from ..modeling.proxy_sam import ProxyPromptSAM
from ..training.episodes import EpisodeBank
from .studies import Support


class ImageSegmenter:
    """Slice by slice (2D images whole) from a PPG support embedding.

    Args:
        policy: how masks are decoded; a sparse policy applies where the study's encoder features are cached.
        tile: segment images larger than the encoder input in overlapping native-resolution tiles of this side
            (`NativeTileInferer`; support pairs and fine-tune episodes cut into the same tiles); None: one
            down-scaled pass per image or slice.
    """

    fine_tunes = True  # the on-the-fly fine-tune trains image episodes

    def __init__(self, policy: DecodePolicy = EVERY_SLICE, tile: int | None = None) -> None:
        self.policy, self.tile = policy, tile
        self.inferer = NativeTileInferer(tile) if tile else None

    @property
    def reads_features(self) -> bool:
        """Whether it can segment from encoder features computed ahead (not through tiles)."""
        return self.inferer is None

    def pairs(self, samples: list[Sample]) -> list[Sample]:
        """The support's pairs as the model sees them: whole, or cut into the tiles the targets are cut into."""
        return tile_samples(samples, self.tile) if self.tile else samples

    def encode_support(self, model: ProxyPromptSAM, support: Support, bank: EpisodeBank | None):
        """The support embedding; from a fine-tune's bank (its view 0 is the support as read, encoded) when given."""
        if bank is not None and self.inferer is None:
            index = list(range(len(bank)))
            with torch.no_grad():
                return model.encode_prepared_support(bank.x[0], bank.masks[0], bank.features(model, 0, index))
        return encode_samples(model, self.pairs(support.samples), support.label_ids)

    def segment(
        self, model: ProxyPromptSAM, image: Tensor, embedding, label_ids: Sequence[int], *, axis: int,
        skip: Sequence[int] = (), features: Features | None = None,
    ) -> tuple[Tensor, dict]:  # fmt: skip
        policy = self.policy if features is not None else self.policy.dense()
        label = segment_image(
            model, image, embedding, label_ids, axis=axis, skip=skip, features=features, inferer=self.inferer,
            policy=policy,
        )  # fmt: skip
        return label, {}


class VideoSegmenter:
    """SAM 2 in video mode: a volume's slices propagated through SAM 2's memory from the middle slice both ways (or
    from the middle of the slices to segment), the support as conditioning memories; 2D images as one image, decoded
    with ``policy``."""

    fine_tunes = False
    reads_features = False

    def __init__(self, policy: DecodePolicy = EVERY_SLICE) -> None:
        self.policy = policy.dense()

    def pairs(self, samples: list[Sample]) -> list[Sample]:
        return samples

    def encode_support(self, model: ProxyPromptSAM, support: Support, bank: EpisodeBank | None):
        return video_support(model, support)

    def segment(
        self, model: ProxyPromptSAM, image: Tensor, embedding, label_ids: Sequence[int], *, axis: int,
        skip: Sequence[int] = (), features: Features | None = None,
    ) -> tuple[Tensor, dict]:  # fmt: skip
        if image.dim() != 4:
            return segment_image(model, image, embedding, label_ids, axis=axis, policy=self.policy), {}
        slices = as_slices(image, axis)
        todo = [z for z in range(len(slices)) if z not in set(skip)]
        out = torch.zeros((len(slices), *slices.shape[2:]), dtype=torch.uint8)
        if todo:
            out[todo] = label_clip(model, slices[todo], embedding, label_ids, len(todo) // 2)
        return out.movedim(0, axis), {"propagation": "SAM 2 memory, both ways from the middle slice"}
