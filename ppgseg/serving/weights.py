"""The weights a support set is segmented with: the base weights, or the base fine-tuned on the fly on that support
(`training.finetune`), kept in memory and on disk per (base weights, support, settings)."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import load_ppg, save_ppg
from ..data.contract import Sample
from ..modeling.proxy_sam import ProxyPromptSAM
from ..training.episodes import EpisodeBank
from ..training.finetune import SupportFineTune, snapshot
from ..training.registered import RegistrationTuned
from .studies import Support, digest, keep

logger = logging.getLogger("ppgseg")


@dataclass(frozen=True)
class FineTuneSettings:
    """The on-the-fly fine-tune.

    Args:
        seconds: time bound of a fine-tune on other studies' labels (0: never fine-tune).
        lr: its learning rate (the paper's SGD otherwise; at the paper's 0.01 a minute on nine CT slices collapsed the
            bundle's default weights to empty masks). A fine-tune that does not lower the loss of fixed episodes of
            the support is discarded.
        seed: its episodes.
        atlas_episodes: episodes of the registration route's fine-tune on the labelled studies registered onto each
            other (`RegistrationFineTune`; 0: never).
        atlas_lr: its AdamW learning rate.
    """

    seconds: float = 60.0
    lr: float = 0.002
    seed: int = 0
    atlas_episodes: int = 400
    atlas_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ValueError(f"finetune seconds must be >= 0, got {self.seconds}")
        if self.atlas_episodes < 0:
            raise ValueError(f"atlas_finetune_episodes must be >= 0, got {self.atlas_episodes}")


ON_THE_FLY = FineTuneSettings()  # the app's defaults


class SupportWeights:
    """Loads into ``model`` the weights for a support set. Not thread-safe: call under the service's lock.

    Args:
        model: the served model, its base weights loaded.
        description: a short description of the base weights, given back with every result.
        cache_dir: where fine-tuned weights are kept across restarts (``finetuned/``).
        settings: the on-the-fly fine-tune.
        trained_on: stamps of the studies the base weights were trained on; a support set made only of those is
            used without fine-tuning.
        memory: fine-tuned weights kept in memory.
    """

    def __init__(
        self,
        model: ProxyPromptSAM,
        description: str,
        cache_dir: str | Path,
        *,
        settings: FineTuneSettings = ON_THE_FLY,
        trained_on: Sequence[str] = (),
        memory: int = 8,
    ) -> None:
        self.model, self.cache_dir, self.settings, self.memory = model, Path(cache_dir), settings, memory
        self.finetune = SupportFineTune(lr=settings.lr, seed=settings.seed)
        self._states: OrderedDict[str, tuple[dict, str]] = OrderedDict()  # weights key -> (state, description)
        self.set_base(description, trained_on)

    def set_base(self, description: str, trained_on: Sequence[str] = ()) -> None:
        """Take the model's current weights as the base (after loading new trained weights into it)."""
        self.base = snapshot(self.model)
        self.description, self.trained_on = description, set(trained_on)
        self.base_key = digest(description, sorted(self.trained_on))
        self._states.clear()

    def load(
        self, support: Support, pairs: list[Sample], *, trains: bool = True
    ) -> tuple[str, str, EpisodeBank | None]:
        """Load the weights for ``support`` (its ``pairs`` as the model sees them) into the model: the base weights
        where they were trained on every support study, fine-tuning is off or ``trains`` is False, else the base
        fine-tuned on the pairs. Returns the weights key, their description and the fine-tune's bank (None when
        nothing was trained now)."""
        known = bool(support.stamps) and set(support.stamps) <= self.trained_on
        bound = self.settings.seconds
        if bound == 0 or known or not trains:
            self._load(self.base)
            return self.base_key, self.description, None
        s = self.settings
        key = digest(self.base_key, support.key, bound, s.lr, s.seed)
        description = self._kept(key)
        if description is not None:
            return key, description, None
        done = self.finetune(self.model, pairs, support.label_ids, bound, same_study=support.same_study)
        description = done.describe(self.description, len(support.samples))
        self._keep(key, description, support.sources)
        return key, description, done.bank

    def load_atlases(
        self, stamps: Sequence[str], label_ids: Sequence[int], axis: int, train: Callable[[], RegistrationTuned]
    ) -> str:
        """Load the weights for the registration route with labelled studies (their ``stamps``) and return their
        description: the base weights where the registration fine-tune is off, there are fewer than 2 studies or the
        base weights were trained on all of them; else the base trained by ``train()`` (`RegistrationFineTune` on the
        studies registered onto each other), kept in memory and on disk per (base, studies, labels, axis, settings)."""
        s = self.settings
        if s.atlas_episodes == 0 or len(stamps) < 2 or set(stamps) <= self.trained_on:
            self._load(self.base)
            return self.description
        key = digest(self.base_key, "registration/2", list(stamps), list(label_ids), axis, s.atlas_episodes, s.atlas_lr,
                     s.seed)  # fmt: skip
        description = self._kept(key)
        if description is None:
            description = train().describe(self.description, len(stamps))
            self._keep(key, description, list(stamps))
        return description

    def _kept(self, key: str) -> str | None:
        """Load the weights kept under ``key`` (memory, else disk) and return their description; None (the base
        weights loaded) where none are kept."""
        if key in self._states:
            state, description = self._states[key]
            self._states.move_to_end(key)
            self._load(state)
            return description
        path = self.cache_dir / "finetuned" / f"{key}.pt"
        self._load(self.base)
        if not path.is_file():
            return None
        load_ppg(self.model, path)
        description = json.loads(path.with_suffix(".json").read_text())["weights"]
        keep(self._states, key, (snapshot(self.model), description), self.memory)
        return description

    def _keep(self, key: str, description: str, sources: list[str]) -> None:
        """Keep the model's weights, just trained, under ``key`` in memory and on disk."""
        logger.info(description)
        path = self.cache_dir / "finetuned" / f"{key}.pt"
        save_ppg(self.model, path)
        path.with_suffix(".json").write_text(json.dumps({"weights": description, "sources": sources}))
        keep(self._states, key, (snapshot(self.model), description), self.memory)

    def load_base(self) -> None:
        """Load the base weights (for what segments with them as they are)."""
        self._load(self.base)

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=False)
