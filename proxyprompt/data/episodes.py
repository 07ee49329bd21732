"""Few-shot episodes: a target and K support pairs from other subjects, with N objects chosen per episode.

Augmentation follows the paper (Sec. 4.2): brightness, contrast and saturation within +-0.1, rotation up to 15
degrees, shear up to 10 degrees; one draw is applied to every support image and mask of an episode, the target gets
its own draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import RandAffine, Resize
from torch import Tensor

from .contract import Sample


@dataclass(frozen=True)
class Episode:
    """target (C, H, W), target_masks (N, H, W), support (K, C, H, W), support_masks (K, N, H, W), objects: label ids
    in mask order, indices of the target and support samples."""

    target: Tensor
    target_masks: Tensor
    support: Tensor
    support_masks: Tensor
    objects: list[int]
    target_index: int
    support_indices: list[int]


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
        return torch.as_tensor(x).float(), (torch.as_tensor(m) > 0.5).float()


class EpisodeSampler:
    """Draws episodes from 2D samples resized to one size.

    Args:
        samples: from `load_samples`; images are rescaled to [0, 255] per sample and made 3-channel.
        label_ids: the objects the dataset defines.
        num_support: K (the paper trains with M - 1 supports for M training pairs).
        size: side every sample is resized to (the backbone's input size).
        augment: apply `PairAugment`.
    """

    def __init__(
        self,
        samples: list[Sample],
        label_ids: list[int],
        num_support: int,
        *,
        size: int = 256,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        if len(samples) < 2:
            raise ValueError(f"episodes need at least 2 samples (a target and a support), got {len(samples)}")
        if num_support < 1:
            raise ValueError(f"num_support must be >= 1, got {num_support}")
        self.num_support = min(num_support, len(samples) - 1)
        self.label_ids, self.augment = list(label_ids), augment
        self.rng = np.random.default_rng(seed)
        resize_img, resize_lbl = Resize((size, size), mode="bilinear"), Resize((size, size), mode="nearest")
        self.images, self.labels = [], []
        for s in samples:
            img = s.image.float()
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo).clamp_min(1e-8) * 255 if (lo < 0 or hi > 255) else img
            img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
            self.images.append(torch.as_tensor(resize_img(img)).float())
            self.labels.append(torch.as_tensor(resize_lbl(s.label[None].float()))[0].long())

    def __len__(self) -> int:
        return len(self.images)

    def sample(self) -> Episode:
        rng = self.rng
        target = int(rng.integers(len(self)))
        support = [
            int(i) for i in rng.choice([i for i in range(len(self)) if i != target], self.num_support, replace=False)
        ]
        present = [
            o
            for o in self.label_ids
            if bool((self.labels[target] == o).any()) and any(bool((self.labels[i] == o).any()) for i in support)
        ]
        if not present:  # e.g. a 3D slice with one organ only: fall back to what the target shows
            present = [o for o in self.label_ids if bool((self.labels[target] == o).any())] or self.label_ids[:1]
        if rng.random() < 0.5:
            objects = [present[i] for i in rng.permutation(len(present))]
        else:
            k = int(rng.integers(1, len(present) + 1))
            objects = [present[i] for i in rng.choice(len(present), k, replace=False)]

        def masks(i: int) -> Tensor:
            return torch.stack([(self.labels[i] == o).float() for o in objects])  # (N, H, W)

        t_img, t_masks = self.images[target], masks(target)
        s_imgs, s_masks = [self.images[i] for i in support], [masks(i) for i in support]
        if self.augment:
            t_img, t_masks = PairAugment(rng)(t_img, t_masks)
            shared = PairAugment(rng)  # one draw for the whole support set
            pairs = [shared(img, m) for img, m in zip(s_imgs, s_masks, strict=True)]
            s_imgs, s_masks = [p[0] for p in pairs], [p[1] for p in pairs]
        return Episode(t_img, t_masks, torch.stack(s_imgs), torch.stack(s_masks), objects, target, support)
