"""Train task: fine-tunes PPG + LoRA on the datastore's labelled studies with the bundle's own training config
(`bundle/configs/train.json`), then hands the best weights to the infer tasks."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from ignite.engine import Events
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs.proxy_prompt import ProxyPromptConfig

logger = logging.getLogger(__name__)


class ProxyPromptTrain(TrainTask):
    """Episodic fine-tuning on the labelled studies (the last fifth, at least one, validates). Request options:
    ``max_epochs``, ``episodes_per_epoch``, ``num_support``, ``learning_rate``, ``views``, ``max_slices``."""

    def __init__(self, config: ProxyPromptConfig, datastore) -> None:
        super().__init__("Fine-tune PPG + LoRA on the labelled studies (episodes, as the bundle trains)")
        self.app, self.datastore = config, datastore
        self.work = config.model_dir / "train"
        self.stats_path = self.work / "train_stats.json"

    def config(self) -> dict:
        return {
            "max_epochs": 4,
            "episodes_per_epoch": 50,
            "num_support": 4,
            "learning_rate": 0.01,
            "views": 3,
            "max_slices": 8,
        }

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text()) if self.stats_path.is_file() else {}

    def write_datalist(self, datastore) -> Path:
        """A data-contract folder (dataset.json) over the datastore's labelled studies."""
        studies = sorted(self.app.labelled(datastore).values(), key=lambda s: s.id)
        if len(studies) < 3:
            raise ValueError(
                f"training needs at least 3 labelled studies (2 to make episodes, 1 to validate); the datastore has "
                f"{len(studies)}: label and submit more"
            )
        n_val = max(1, len(studies) // 5)
        pairs = [{"image": str(s.image), "label": str(s.label)} for s in studies]
        meta = {
            "name": "datastore",
            "labels": {"0": "background", **{str(v): n for n, v in self.app.labels.items()}},
            "training": pairs[:-n_val],
            "validation": pairs[-n_val:],
            "stamps": [s.stamp() for s in studies[:-n_val]],
        }
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "dataset.json").write_text(json.dumps(meta, indent=2))
        return self.work

    def __call__(self, request: dict, datastore) -> dict:
        opts = {**self.config(), **{k: request[k] for k in self.config() if k in request}}
        dataset = self.write_datalist(datastore)
        init, description, _ = self.app.base_weights()
        out = self.work / "run"
        parser = ConfigParser()
        parser.read_config(str(self.app.bundle / "configs" / "train.json"))
        parser.update(
            {
                "bundle_root": str(self.app.bundle),
                "dataset_dir": str(dataset),
                "output_dir": str(out),
                "backbone": self.app.backbone,
                "backbone_checkpoint": self.app.checkpoint,
                "preset": self.app.preset,
                "init_ckpt": str(init) if init else None,
                "axis": self.app.axis,
                "seed": self.app.seed,
                "resume": False,  # each train request starts from the app's current weights
                "train#trainer#max_epochs": int(opts["max_epochs"]),
                "episodes_per_epoch": int(opts["episodes_per_epoch"]),
                "num_support": int(opts["num_support"]),
                "learning_rate": float(opts["learning_rate"]),
                "views": int(opts["views"]),
                "max_slices": int(opts["max_slices"]),
            }
        )
        trainer = parser.get_parsed_content("train#trainer")
        evaluator = parser.get_parsed_content("validate#evaluator")
        start, started = time.time(), time.strftime("%Y-%m-%d %H:%M:%S")
        logger.info(f"training from {description} on {dataset / 'dataset.json'}: {opts}")

        def write_stats(engine, done: bool = False) -> None:
            # 3D Slicer's MONAILabel panel reads `total_time` as "training finished": written only at the end
            stats = {
                "model": request.get("model"),
                "start_ts": started,
                **({"total_time": f"{time.time() - start:.0f} s"} if done else {}),
                "epoch": engine.state.epoch,
                "total_epochs": engine.state.max_epochs,
                "train_loss": float(engine.state.output["loss"]) if engine.state.output else None,
                "best_metric": float(evaluator.state.best_metric),
                "best_metric_epoch": int(evaluator.state.best_metric_epoch),
                "key_metric": "val_mean_dice",
            }
            self.stats_path.write_text(json.dumps(stats, indent=2))
            logger.info(f"epoch {engine.state.epoch}/{engine.state.max_epochs}: {stats}")

        trainer.add_event_handler(Events.EPOCH_COMPLETED, write_stats)
        trainer.add_event_handler(Events.COMPLETED, write_stats, True)
        trainer.run()
        best = out / "model.pt" if (out / "model.pt").is_file() else out / "model_final.pt"
        tmp = self.app.trained.with_suffix(".tmp")
        shutil.copyfile(best, tmp)
        meta = json.loads((dataset / "dataset.json").read_text())
        self.app.trained.with_suffix(".json").write_text(
            json.dumps(
                {
                    "trained_on": meta["stamps"],
                    "started_from": description,
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "best_val_mean_dice": float(evaluator.state.best_metric),
                },
                indent=2,
            )
        )
        tmp.replace(self.app.trained)  # the infer tasks pick it up on their next request
        return self.stats()
