"""Few-shot episodes: a target and K support pairs from other subjects, with N objects chosen per episode.

Augmentation follows the paper (Sec. 4.2): brightness, contrast and saturation within +-0.1, rotation up to 15
degrees, shear up to 10 degrees. One draw is applied to every support image and mask of an episode; the target gets
its own draw (see `ppgseg.training.EpisodeBank`, which precomputes the draws as views of the training set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from monai.transforms import RandAffine
from monai.utils import convert_to_tensor
from torch import Tensor

from .contract import Sample


class PairAugment:
    """One random draw of the paper's augmentation, applied identically to any number of (image, masks) pairs."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.brightness, self.contrast, self.saturation = rng.uniform(-0.1, 0.1, 3)
        shear = math.tan(math.radians(10))
        self.affine = RandAffine(
            prob=1.0, rotate_range=(math.radians(15),), shear_range=(shear, shear), padding_mode="zeros"
        )
        self.affine.set_random_state(seed=int(rng.integers(2**31)))
        self.affine.randomize()

    def __call__(self, image: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """image (C, H, W) in [0, 255], masks (N, H, W) -> the same, transformed."""
        x = image * (1 + self.brightness)
        mean = x.mean()
        x = (x - mean) * (1 + self.contrast) + mean
        if x.shape[0] == 3:
            grey = x.mean(dim=0, keepdim=True)
            x = (x - grey) * (1 + self.saturation) + grey
        x = self.affine(x.clamp(0, 255), mode="bilinear", randomize=False)
        m = self.affine(masks.float(), mode="nearest", randomize=False)
        x, m = convert_to_tensor(x, track_meta=False), convert_to_tensor(m, track_meta=False)
        return x.float(), (m > 0.5).float()


def subject_of(sample: Sample) -> str:
    """The study a sample comes from: slices of one volume share it (``path#axis:index`` -> ``path``)."""
    return sample.source.split("#", 1)[0]


@dataclass(frozen=True)
class EpisodeDraw:
    """Indices of the target and its supports, and the label ids to segment, in mask order."""

    target: int
    support: list[int]
    objects: list[int]


class EpisodeSampler:
    """Draws episodes over labelled 2D samples.

    The support never comes from the target's own study (slices of one volume are one study), and the objects are
    a random ordered subset of those the target and the support show (all of them half the time), so the model learns
    to segment what the support masks show.

    Args:
        samples: from `load_samples`.
        label_ids: the objects the dataset defines.
        num_support: K (the paper trains with M - 1 supports for M training pairs); fewer when fewer studies exist.
        same_study: in-volume support (a user's slices of the volume being segmented): supports may come from the
            target's own study, and the target itself serves as its own support (in another augmented view of
            `EpisodeBank`) when it is the only sample.
    """

    def __init__(
        self, samples: list[Sample], label_ids: list[int], num_support: int, *, seed: int = 0, same_study: bool = False
    ) -> None:
        subjects = [subject_of(s) for s in samples]
        if same_study:
            subjects = [f"{s}#{i}" for i, s in enumerate(subjects)]  # every sample its own "study"
        if not samples:
            raise ValueError("episodes need at least one labelled sample, got none")
        if len(set(subjects)) < 2 and not same_study:
            raise ValueError(
                f"episodes need at least 2 samples from different studies (a target and a support), got "
                f"{len(samples)} sample(s) from {len(set(subjects))} study(ies)"
            )
        if num_support < 1:
            raise ValueError(f"num_support must be >= 1, got {num_support}")
        self.subjects, self.label_ids, self.same_study = subjects, list(label_ids), same_study
        self.shows = [s.shows(self.label_ids) for s in samples]
        self.sources = [s.source for s in samples]
        self.num_support = num_support
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.subjects)

    def draw(self, rng: np.random.Generator | None = None, num_support: int | None = None) -> EpisodeDraw:
        """An episode with ``num_support`` supports (default: the sampler's K)."""
        rng, k = rng or self.rng, num_support or self.num_support
        target = int(rng.integers(len(self)))
        others = [i for i in range(len(self)) if self.subjects[i] != self.subjects[target]] or [target]
        support = [int(i) for i in rng.choice(others, min(k, len(others)), replace=False)]
        shown = set().union(*(self.shows[i] for i in support))
        present = [o for o in self.label_ids if o in self.shows[target] and o in shown]
        if not present:  # e.g. a slice whose organ no support shows: ask for what the support shows
            present = [o for o in self.label_ids if o in shown] or self.label_ids[:1]
        if rng.random() < 0.5:
            objects = [present[i] for i in rng.permutation(len(present))]
        else:
            k = int(rng.integers(1, len(present) + 1))
            objects = [present[i] for i in rng.choice(len(present), k, replace=False)]
        return EpisodeDraw(target, support, objects)
