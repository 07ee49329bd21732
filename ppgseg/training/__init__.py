"""Episodic training: episode banks, the loop and its optimisers, the on-the-fly fine-tune, and video episodes."""

from .episodes import EpisodeBank, EpisodeDataset, EpisodeNet
from .loop import OPTIMIZERS, make_optimizer, train_episodes

__all__ = ["OPTIMIZERS", "EpisodeBank", "EpisodeDataset", "EpisodeNet", "make_optimizer", "train_episodes"]
