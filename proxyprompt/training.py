"""Episodic few-shot training on cached frozen-encoder features (presets whose image encoder has no LoRA)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor

from .modeling.proxy_sam import ProxyPromptSAM


class FeatureBank:
    """Preprocessed images and masks of M subjects with their frozen-encoder features, computed once.

    Args:
        images: (M, 1 or 3, H, W) as loaded.  masks: (M, N, H, W) binary, one channel per object.
    """

    def __init__(self, model: ProxyPromptSAM, images: Tensor, masks: Tensor) -> None:
        if model.encoder_trains:
            raise ValueError("the image encoder trains (LoRA on the encoder): its features cannot be cached")
        if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        self.x, geo = model.backbone.preprocess(images)
        self.masks = model.backbone.preprocess_masks(masks, geo)  # (M, N, S, S)
        self.features = model.encode_images(self.x)

    def __len__(self) -> int:
        return len(self.x)


def sample_episode(rng: np.random.Generator, size: int, num_objects: int, num_support: int):
    """A target, ``num_support`` other subjects as its support, and a random non-empty ordered subset of objects
    (all of them half the time), so that the model learns to segment what the support masks show."""
    target = int(rng.integers(size))
    others = [i for i in range(size) if i != target]
    support = [int(i) for i in rng.choice(others, size=min(num_support, len(others)), replace=False)]
    if rng.random() < 0.5:
        objects = list(rng.permutation(num_objects))
    else:
        objects = list(rng.choice(num_objects, size=int(rng.integers(1, num_objects + 1)), replace=False))
    return target, support, [int(o) for o in objects]


def episode_logits(
    model: ProxyPromptSAM, bank: FeatureBank, target: Sequence[int], support: Sequence[int], objects: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Low-res logits (B, N, h, w) for targets given a support, and the matching ground truth."""
    sup = model.encode_prepared_support(bank.x[support], bank.masks[support][:, objects], bank.features.select(support))
    logits = model.segment_features(bank.features.select(target), sup)
    truth = F.interpolate(bank.masks[target][:, objects], size=logits.shape[-2:], mode="area")
    return logits, (truth > 0.5).float()


def make_optimizer(model: ProxyPromptSAM, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4):
    """The paper's optimiser: SGD, momentum 0.9, lr 0.01, weight decay 5e-4, on the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_episodes(
    model: ProxyPromptSAM,
    bank: FeatureBank,
    *,
    steps: int,
    num_support: int,
    optimizer=None,
    loss_fn=None,
    seed: int = 0,
    log_every: int = 0,
) -> list[float]:
    """Train on ``steps`` random episodes, by default with the Dice loss (paper Eq. 13); returns the losses."""
    rng = np.random.default_rng(seed)
    optimizer = optimizer or make_optimizer(model)
    loss_fn = loss_fn or DiceLoss(sigmoid=True)
    num_objects = bank.masks.shape[1]
    losses = []
    model.train()
    for step in range(steps):
        target, support, objects = sample_episode(rng, len(bank), num_objects, num_support)
        logits, truth = episode_logits(model, bank, [target], support, objects)
        loss = loss_fn(logits, truth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  dice loss {np.mean(losses[-log_every:]):.3f}", flush=True)
    model.eval()
    return losses
