"""The support set of a data-contract folder, and labelled samples encoded as a support embedding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..backbones.base import encoder_frame
from ..data.contract import Sample, read_labels
from ..data.episodes import subject_of
from ..data.intensity import to_byte_range
from ..data.splits import select_objects, split_samples
from ..data.tiles import tile_samples
from ..modeling.generator import SupportEmbedding
from ..modeling.proxy_sam import ProxyPromptSAM


class SupportSet:
    """K labelled pairs of a data-contract folder's ``training`` list that show the requested objects.

    Pairs that show every requested object are preferred, one per study first (slices of one volume are one study),
    in a random order fixed by ``seed``.

    Args:
        folder: a data-contract folder.
        num_support: K.
        objects: label names to segment (None: all of the folder's labels).
        axis: slicing axis for 3D studies.
    """

    def __init__(
        self,
        folder: str | Path,
        num_support: int,
        *,
        objects: Sequence[str] | str | None = None,
        axis: int = 2,
        seed: int = 0,
        split: str = "training",
    ) -> None:
        if num_support < 1:
            raise ValueError(f"num_support must be >= 1, got {num_support}")
        self.folder = Path(folder)
        self.objects = select_objects(read_labels(folder), objects, str(self.folder / "dataset.json"))
        samples = split_samples(folder, split, axis=axis)
        ids = list(self.objects)
        shows = [s.shows(ids) for s in samples]
        rng = np.random.default_rng(seed)
        order = [int(i) for i in rng.permutation(len(samples))]
        order.sort(key=lambda i: -len(shows[i]))  # stable: most objects first, random among equals
        chosen, studies = [], set()
        for i in order:  # one pair per study first
            if len(chosen) < num_support and subject_of(samples[i]) not in studies and shows[i]:
                chosen.append(i)
                studies.add(subject_of(samples[i]))
        chosen += [i for i in order if i not in chosen and shows[i]][: num_support - len(chosen)]
        missing = [self.objects[o] for o in ids if not any(o in shows[i] for i in chosen)]
        if missing:
            raise ValueError(
                f"{self.folder / 'dataset.json'}: no {split} pair shows {missing}, so the support set cannot show "
                f"what to segment; label it in at least one pair or leave it out of objects"
            )
        self.samples = [samples[i] for i in chosen]

    @property
    def label_ids(self) -> list[int]:
        return list(self.objects)

    @property
    def names(self) -> list[str]:
        return list(self.objects.values())

    def sources(self) -> list[str]:
        return [s.source for s in self.samples]

    def encode(self, model: ProxyPromptSAM, *, tile: int | None = None) -> SupportEmbedding:
        """The support embedding; with ``tile``, of the pairs cut into native-resolution tiles (`data.tiles`)."""
        samples = tile_samples(self.samples, tile) if tile else self.samples
        return encode_samples(model, samples, self.label_ids)


def encode_samples(model: ProxyPromptSAM, samples: Sequence[Sample], label_ids: Sequence[int]) -> SupportEmbedding:
    """Encode labelled samples as a support set for ``label_ids`` (each pair brought into the encoder's frame on its
    own, so sizes may differ)."""
    pairs = [encoder_frame(model.backbone, to_byte_range(s.image), s.masks(list(label_ids))) for s in samples]
    x, m = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    with torch.no_grad():
        return model.encode_prepared_support(x, m, model.encode_images(x))
