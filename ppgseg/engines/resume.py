"""Training that survives being stopped: a checkpoint of everything the next episodes depend on, written every few
epochs, and read back when a run starts in an output folder that holds one."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from ..checkpoint import trainable_state
from ..training.episodes import EpisodeDataset
from .handlers import is_main_process

logger = logging.getLogger("ppgseg")


class ResumableTraining:
    """Checkpoints a bundle training run to ``output_dir/checkpoint.pt`` every ``every`` epochs (``every`` x
    ``episodes_per_epoch`` episodes) and resumes from it.

    The checkpoint holds the trainable weights (PPG + LoRA), the optimizer, the learning-rate schedule, the episode
    sampler's random state, torch's random state, the trainer's epoch and iteration and the evaluator's best metric,
    so that a run stopped after a checkpoint and started again gives the weights of a run never stopped.

    Args:
        network: the model being trained.
        optimizer, lr_scheduler: the trainer's.
        dataset: the episode sampler (`EpisodeDataset`).
        evaluator: the validation engine whose best metric decides ``model.pt`` (None: no validation).
        output_dir: the run's folder.
        every: epochs between checkpoints (0: never write one).
        resume: True: continue from the checkpoint, which must exist; False: start afresh (an existing checkpoint is
            overwritten at the next save); None: continue when the folder holds an unfinished run's checkpoint.
        seed: the run's seed, stored and checked: a checkpoint of another seed is refused.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        dataset: EpisodeDataset,
        output_dir: str | Path,
        *,
        evaluator: Engine | None = None,
        every: int = 1,
        resume: bool | None = None,
        seed: int = 0,
    ) -> None:
        if every < 0:
            raise ValueError(f"checkpoint_epochs must be >= 0, got {every}")
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.dataset, self.evaluator, self.every, self.resume, self.seed = dataset, evaluator, every, resume, seed
        self.path = Path(output_dir) / "checkpoint.pt"
        if resume and not self.path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {self.path}; start without --resume")

    def attach(self, engine: Engine) -> None:
        if self.resume is not False and self.path.is_file():
            done = torch.load(self.path, map_location="cpu", weights_only=False)["trainer"]["epoch"]
            if done < engine.state.max_epochs or self.resume:
                self.load(engine)
            else:  # a finished run in this folder: the same command trains again, as before checkpoints existed
                logger.info(f"{self.path} holds a finished run ({done} epochs): training afresh")
        if self.every:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self.save)

    def save(self, engine: Engine) -> None:
        if not is_main_process():
            return
        state = {
            "seed": self.seed,
            "trainer": {"epoch": engine.state.epoch, "iteration": engine.state.iteration},
            "weights": trainable_state(self.network),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "sampler": self.dataset.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "evaluator": self._evaluator_state(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)  # whole or not at all: a run stopped while writing keeps the previous checkpoint
        logger.info(f"checkpoint after epoch {engine.state.epoch} ({engine.state.iteration} episodes): {self.path}")

    def load(self, engine: Engine) -> None:
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state["seed"] != self.seed:
            raise ValueError(f"{self.path} was written by a run with seed {state['seed']}, this run has {self.seed}")
        done = state["trainer"]["epoch"]
        if done >= engine.state.max_epochs:
            raise ValueError(
                f"{self.path} is at epoch {done}, this run's max_epochs is {engine.state.max_epochs}: nothing to "
                "resume; raise max_epochs (train#trainer#max_epochs) or start afresh with --resume false"
            )
        missing = set(trainable_state(self.network)) - set(state["weights"])
        if missing:
            raise ValueError(f"{self.path} lacks weights {sorted(missing)[:4]}: written for another model")
        self.network.load_state_dict(state["weights"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.dataset.rng.bit_generator.state = state["sampler"]
        torch.set_rng_state(state["torch_rng"])
        engine.state.epoch, engine.state.iteration = done, state["trainer"]["iteration"]
        if self.evaluator is not None and state["evaluator"] is not None:
            self.evaluator.state.best_metric = state["evaluator"]["best_metric"]
            self.evaluator.state.best_metric_epoch = state["evaluator"]["best_metric_epoch"]
            self.evaluator.state.epoch = done
        logger.info(f"resumed from {self.path}: epoch {done} of {engine.state.max_epochs}")

    def _evaluator_state(self) -> dict | None:
        if self.evaluator is None:
            return None
        return {
            "best_metric": self.evaluator.state.best_metric,
            "best_metric_epoch": self.evaluator.state.best_metric_epoch,
        }
