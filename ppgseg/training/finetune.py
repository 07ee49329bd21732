"""The on-the-fly fine-tune: a model's trainable weights (PPG + LoRA) trained on a support set's own episodes within
a time bound, serving the best weights checked on fixed episodes of that support (what the MONAI Label app runs on a
support set the weights were not trained on)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceLoss
from torch import Tensor

from ..checkpoint import trainable_state
from ..data.contract import Sample
from ..modeling.proxy_sam import ProxyPromptSAM
from .episodes import EpisodeBank, EpisodeNet
from .loop import make_optimizer, train_episodes

# the support-episode loss is checked at these shares of the fine-tune's time and the best weights checked are served:
# how many episodes fit in the bound varies with the machine, and later is not always better (generated studies,
# 9 support pairs: check loss 0.403 after 48 episodes, 0.506 after 56; liver Dice 0.700 -> 0.555)
FINETUNE_CHECKS = (0.5, 0.75, 1.0)


def snapshot(model: ProxyPromptSAM) -> dict[str, Tensor]:
    """A copy of the model's trainable weights (PPG + LoRA) as they are now."""
    return {k: v.clone() for k, v in trainable_state(model).items()}


@dataclass
class FineTuned:
    """What a fine-tune did: its bank (view 0: the support as read), the best weights checked (None: none beat the
    start), and the check losses before, at the best check and at the end."""

    bank: EpisodeBank
    best: dict[str, Tensor] | None
    before: float
    best_loss: float
    last_loss: float
    best_episode: int
    episodes: int
    seconds: float

    def describe(self, base: str, pairs: int) -> str:
        """How the weights served are named in an answer."""
        what = f"{pairs} support pairs ({self.episodes} episodes, {self.seconds:.0f} s, support-episode loss "
        if self.best is None:  # never serve weights that do worse on the support's own episodes than the base did
            return f"{base} (kept: a fine-tune on {what}{self.before:.3f} -> {self.last_loss:.3f}) did not help)"
        at = (
            ""
            if self.best_episode == self.episodes
            else (f"; weights after episode {self.best_episode}, {self.last_loss:.3f} at the end")
        )
        return f"{base} + fine-tuned on the fly on {what}{self.before:.3f} -> {self.best_loss:.3f}{at})"


class SupportFineTune:
    """Fine-tunes on a support set's own episodes (supports and target drawn among its pairs) for ``seconds``.

    Args:
        lr: the learning rate (the paper's SGD otherwise; at the paper's 0.01 a minute on nine CT slices collapsed
            the bundle's default weights to empty masks).
        seed: episodes, augmentation views and check episodes.
        checks: shares of the time bound at which the loss of 8 fixed support episodes is checked.
    """

    def __init__(self, *, lr: float = 0.002, seed: int = 0, checks: Sequence[float] = FINETUNE_CHECKS) -> None:
        self.lr, self.seed, self.checks = lr, seed, tuple(checks)

    def __call__(
        self,
        model: ProxyPromptSAM,
        samples: list[Sample],
        label_ids: Sequence[int],
        seconds: float,
        *,
        same_study: bool,
    ) -> FineTuned:
        """Train ``model`` in place and leave the best checked weights in it (its start weights when none was
        better). ``same_study``: the pairs come from one study, so episodes take supports from the target's own."""
        start = time.monotonic()
        torch.manual_seed(self.seed)
        bank = EpisodeBank(model, samples, label_ids, views=2, seed=self.seed, same_study=same_study)
        k = max(1, min(4, len(samples) - 1))
        episodes = [bank.draw(np.random.default_rng([self.seed, i]), k) for i in range(8)]
        start_state = snapshot(model)
        check_start = time.monotonic()
        before = self.check_loss(model, bank, episodes)
        trained = time.monotonic()
        deadline = start + seconds - len(self.checks) * (trained - check_start)  # the checks fit in the bound
        optimizer = make_optimizer(model, lr=self.lr)
        losses: list[float] = []
        best_loss, best_episode, best, last = before, 0, None, before
        for i, share in enumerate(self.checks):
            until = trained + share * (deadline - trained)
            losses += train_episodes(
                model, bank, steps=10_000, num_support=k, seed=self.seed + i, until=until, optimizer=optimizer
            )
            last = self.check_loss(model, bank, episodes)
            if last < best_loss:
                best_loss, best_episode, best = last, len(losses), snapshot(model)
        model.load_state_dict(best if best is not None else start_state, strict=False)
        seconds = time.monotonic() - start
        return FineTuned(bank, best, before, best_loss, last, best_episode, len(losses), seconds)

    @staticmethod
    def check_loss(model: ProxyPromptSAM, bank: EpisodeBank, episodes: list[dict]) -> float:
        """Mean Dice loss of fixed episodes of the bank (no gradient, eval mode)."""
        net, loss = EpisodeNet(model, bank).eval(), DiceLoss(sigmoid=True)
        with torch.no_grad():
            return float(np.mean([loss(*net(e)).item() for e in episodes]))
