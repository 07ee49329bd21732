"""The training loop outside ignite (the protocol, the on-the-fly fine-tune) and the optimisers of both loops."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from monai.losses import DiceLoss
from torch import nn
from tqdm import tqdm

from ..modeling.proxy_sam import ProxyPromptSAM
from .episodes import EpisodeBank, EpisodeNet, as_banks, bank_shares, draw_bank

OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(
    model: nn.Module,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    *,
    kind: str = "sgd",
) -> torch.optim.Optimizer:
    """An optimiser over the trainable parameters.

    ``kind="sgd"``: the paper's, SGD with momentum 0.9, lr 0.01 and weight decay 5e-4 by default.
    ``kind="adamw"``: torch's AdamW with its own defaults (``momentum`` and ``weight_decay`` unused), lr 1e-3 by
    default: the decoder fine-tune peer's optimiser. On DRIVE vessels (16 pairs, 250 episodes, one pass) the paper's
    SGD reached Dice 0.163 and AdamW at 3e-3 0.398.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3 if lr is None else lr)
    return torch.optim.SGD(params, lr=0.01 if lr is None else lr, momentum=momentum, weight_decay=weight_decay)


def train_episodes(
    model: ProxyPromptSAM,
    bank: EpisodeBank | Sequence[EpisodeBank],
    *,
    steps: int,
    num_support: int,
    optimizer=None,
    loss_fn=None,
    seed: int = 0,
    until: float | None = None,
    progress: str | None = None,
    net: nn.Module | None = None,
    bank_weights: Sequence[float] | None = None,
) -> list[float]:
    """A plain loop over ``steps`` random episodes (the bundle's trainer runs the same step in ignite), by default
    with the Dice loss (paper Eq. 13); returns the losses. ``until`` (a ``time.monotonic()`` value) ends the loop
    early when reached; at least one step runs. ``progress`` names a progress bar (none when None). ``net`` turns
    an episode into (logits, truth): `EpisodeNet` by default (`VideoEpisodeNet` for video episodes). ``bank`` may
    be a list (several datasets or tasks, each with its own labels): each episode comes from one, drawn uniformly or
    by ``bank_weights`` (`EpisodeDataset`)."""
    banks = as_banks(bank)
    shares = bank_shares(bank_weights, len(banks))
    net = net or EpisodeNet(model, banks)
    rng = np.random.default_rng(seed)
    optimizer = optimizer or make_optimizer(model)
    loss_fn = loss_fn or DiceLoss(sigmoid=True)
    losses = []
    net.train()
    for _ in tqdm(range(steps), desc=progress, leave=False, disable=progress is None):
        if losses and until is not None and time.monotonic() >= until:
            break
        b = draw_bank(rng, len(banks), shares) if len(banks) > 1 else 0
        logits, truth = net({**banks[b].draw(rng, num_support), "bank": b})
        loss = loss_fn(logits, truth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
