"""Handlers of the few-shot engines: the PPG checkpoint (best and final) and the Dice report with overlays."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator
from monai.metrics import compute_dice
from PIL import Image
from torch import Tensor

from ..checkpoint import save_ppg
from ..data.intensity import overlay
from ..modeling.proxy_sam import ProxyPromptSAM

logger = logging.getLogger("ppgseg")


def is_main_process() -> bool:
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


class SavePPG:
    """Writes the PPG + LoRA weights (`save_ppg`, never the frozen backbone): ``model.pt`` whenever the evaluator's
    key metric improves and ``model_final.pt`` when training completes, with the run's ``seed``. Only the first
    process of a distributed run writes."""

    def __init__(
        self, model: ProxyPromptSAM, output_dir: str | Path, *, half: bool = False, seed: int | None = None
    ) -> None:
        self.model, self.dir, self.half, self.seed = model, Path(output_dir), half, seed

    def attach(self, engine: Engine) -> None:
        if isinstance(engine, SupervisedEvaluator):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._best)
        else:
            engine.add_event_handler(Events.COMPLETED, self._final)

    def _best(self, engine: Engine) -> None:
        if is_main_process() and engine.state.best_metric_epoch == engine.state.epoch:
            path = save_ppg(self.model, self.dir / "model.pt", half=self.half, seed=self.seed)
            logger.info(f"best {engine.state.key_metric_name} {engine.state.best_metric:.4f}: wrote {path}")

    def _final(self, engine: Engine) -> None:
        if is_main_process():
            path = save_ppg(self.model, self.dir / "model_final.pt", half=self.half, seed=self.seed)
            logger.info(f"wrote {path} (seed {self.seed})")


def _safe_name(source: str) -> str:
    name, _, where = source.partition("#")
    stem = Path(name).name.split(".")[0]
    return stem + ("_" + where.replace(":", "_") if where else "")


class DiceReport:
    """Dice per object and their mean over an evaluation run: writes ``metrics.json``
    (``{"dice": {name: value}, "mean_dice": value, "targets": count}``) and, for the first ``max_overlays`` targets,
    overlay PNGs (image | ground truth | prediction). A target that does not show an object does not count for
    that object's Dice."""

    def __init__(self, names: Sequence[str], output_dir: str | Path, *, max_overlays: int = 16) -> None:
        self.names, self.dir, self.max_overlays = list(names), Path(output_dir), max_overlays
        self.scores: list[Tensor] = []
        self.metrics: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.scores.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _iteration(self, engine: Engine) -> None:
        out = engine.state.output
        self.scores.append(compute_dice(out["pred"], out["label"], ignore_empty=True)[0])
        if len(self.scores) <= self.max_overlays:
            self.dir.mkdir(parents=True, exist_ok=True)
            img = out["image"]
            row = [overlay(img, torch.zeros_like(out["label"][0])), overlay(img, out["label"][0])]
            row.append(overlay(img, out["pred"][0]))
            Image.fromarray(np.concatenate(row, axis=1)).save(self.dir / f"overlay_{_safe_name(out['source'])}.png")

    def _write(self, engine: Engine) -> None:
        scores = torch.stack(self.scores)  # (targets, N), NaN where the target lacks the object
        dice = {n: float(scores[:, i][~scores[:, i].isnan()].mean()) for i, n in enumerate(self.names)}
        self.metrics = {"dice": dice, "mean_dice": float(np.nanmean(list(dice.values()))), "targets": len(scores)}
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "metrics.json").write_text(json.dumps(self.metrics, indent=2))
        for n, v in dice.items():
            logger.info(f"Dice {n}: {v:.3f}")
        logger.info(f"mean Dice: {self.metrics['mean_dice']:.3f}  ({len(scores)} targets) -> {self.dir}")
