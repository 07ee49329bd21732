"""The app's settings (``--conf`` key/value pairs) and the one model every task of the app shares."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from fastapi import HTTPException

from lib.drawn import DrawnSlices, LastResults
from ppgseg import build_model
from ppgseg.checkpoint import load_ppg
from ppgseg.inference import DecodePolicy
from ppgseg.io import read_image, slice_axis
from ppgseg.modeling.proxy_sam2_video import ProxyPromptVideo
from ppgseg.serving import FineTuneSettings, ImageSegmenter, ProxyPromptService, Study, VideoSegmenter

logger = logging.getLogger(__name__)

DEFAULTS = {
    "models": "proxy_prompt",
    "backbone": "litemedsam",  # litemedsam ships its weights; sam_vit_b/l/h and sam2 need `checkpoint`
    "preset": "cpu",
    "checkpoint": None,  # the backbone's weights (SAM / SAM 2)
    "ppg_checkpoint": None,  # PPG + LoRA weights; default: trained here, else the bundle's model.pt where it fits
    "bundle": None,  # the MONAI bundle folder; default: ../bundle beside the app
    "labels": None,  # "liver,spleen" or '{"liver": 1, "spleen": 2}'; default: the studies folder's dataset.json
    "num_support": "3",  # K labelled studies per support set
    "support_slices": "3",  # slices taken from each labelled support volume
    "axis": "2",  # slicing axis of volumes; "auto": each volume's thickest spacing (2 where voxels are near-isotropic)
    "auto_route": "registration",  # Auto Segmentation of volumes: "registration" (see README) or "fixed" supports
    "finetune_seconds": "60",  # time bound of the on-the-fly fine-tune on a new support set (0: off)
    "finetune_lr": "0.002",  # its SGD learning rate (gentler than training from scratch: few pairs, no schedule)
    "atlas_finetune_episodes": "400",  # registration route: episodes of its fine-tune on the labelled studies (0: off)
    "tile": None,  # segment in native-resolution tiles of this side (e.g. 256 for fundus vessels); default: one pass
    "encode_cache_gb": "4",  # disk for encoder features of studies encoded ahead of need (0: off)
    "min_carried": "0.05",  # an object the support carries nowhere on a slice is left empty there, undecoded (0: off)
    "box_refine": "false",  # refine each mask by a second decoder pass prompted with its own box ("true": on)
    "z_stride": "4",  # decode every 4th slice of a cached study, then only where neighbours disagree (1: every slice)
    "seed": "0",
}
MODELS = ("proxy_prompt",)


def bad_request(status: int, message: str) -> HTTPException:
    logger.warning(f"HTTP {status}: {message}")
    return HTTPException(status_code=status, detail=message)


def parse_labels(conf_value: str | None, studies: Path) -> dict[str, int]:
    """Label names -> values 1..N, from ``--conf labels`` or the studies folder's dataset.json."""
    if conf_value:
        text = conf_value.strip()
        labels = json.loads(text) if text.startswith("{") else {n.strip(): i + 1 for i, n in enumerate(text.split(","))}
        where = "--conf labels"
    else:
        path = studies / "dataset.json"
        if not path.is_file():
            raise ValueError(
                f"no label names: pass --conf labels liver,spleen (values 1..N in that order) or put a dataset.json "
                f'with {{"labels": {{"1": "liver", ...}}}} in {studies}'
            )
        raw = json.loads(path.read_text()).get("labels", {})
        labels = {name: int(value) for value, name in raw.items() if int(value) != 0}
        where = str(path)
    labels = {str(k): int(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[1]))}
    if sorted(labels.values()) != list(range(1, len(labels) + 1)) or "" in labels:
        raise ValueError(f"{where}: label values must be 1..N, one name each; got {labels}")
    return labels


class ProxyPromptConfig:
    """Reads the app's ``--conf`` and builds the shared model lazily (the train process never builds it)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        unknown = sorted(set(conf) - set(DEFAULTS) - {"server_mode", "preload", "skip_scoring"})
        if unknown:
            logger.warning(f"ignoring unknown --conf keys {unknown}; known: {sorted(DEFAULTS)}")
        c = {**DEFAULTS, **{k: v for k, v in conf.items() if v is not None}}
        self.app_dir, self.studies = Path(app_dir), Path(studies)
        self.models = [m.strip() for m in str(c["models"]).split(",") if m.strip()]
        if "all" in self.models:
            self.models = list(MODELS)
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise ValueError(f"--conf models {c['models']!r}: choose among {list(MODELS)} (or all)")
        self.backbone, self.preset, self.checkpoint = c["backbone"], c["preset"], c["checkpoint"]
        self.bundle = Path(c["bundle"]) if c["bundle"] else self.app_dir.parent / "bundle"
        self.labels = parse_labels(c["labels"], self.studies)
        self.auto_axis = str(c["axis"]) == "auto"
        try:
            self.num_support, self.support_slices = int(c["num_support"]), int(c["support_slices"])
            self.axis = 2 if self.auto_axis else int(c["axis"])
            finetune_seconds, finetune_lr = float(c["finetune_seconds"]), float(c["finetune_lr"])
            atlas_episodes = int(c["atlas_finetune_episodes"])
            self.seed = int(c["seed"])
            self.encode_cache_bytes = int(float(c["encode_cache_gb"]) * 2**30)
            self.tile = int(c["tile"]) if c["tile"] else None
            min_carried, z_stride = float(c["min_carried"]), int(c["z_stride"])
        except ValueError as err:
            raise ValueError(
                "--conf num_support, support_slices, axis, finetune_seconds, finetune_lr, atlas_finetune_episodes, "
                f"seed, tile, encode_cache_gb, min_carried, z_stride: not a number ({err})"
            ) from err
        self.auto_route = str(c["auto_route"])
        if self.auto_route not in ("registration", "fixed"):
            raise ValueError(f"--conf auto_route: 'registration' or 'fixed', got {self.auto_route!r}")
        if str(c["box_refine"]).lower() not in ("true", "false"):
            raise ValueError(f"--conf box_refine: 'true' or 'false', got {c['box_refine']!r}")
        try:
            self.policy = DecodePolicy(
                min_carried=min_carried, box_refine=str(c["box_refine"]).lower() == "true", z_stride=z_stride
            )
            self.finetune = FineTuneSettings(finetune_seconds, finetune_lr, self.seed, atlas_episodes)
        except ValueError as err:
            raise ValueError(f"--conf: {err}") from err
        if self.tile and self.backbone == "sam2":
            raise ValueError("--conf tile: SAM 2's video mode propagates whole slices; leave tile unset")
        self.explicit_ppg = Path(c["ppg_checkpoint"]) if c["ppg_checkpoint"] else None
        self.model_dir = self.app_dir / "model"
        self.trained = self.model_dir / "proxy_prompt.pt"  # what the train task writes
        self._service: ProxyPromptService | None = None
        self._loaded: tuple | None = None
        self._lock = threading.Lock()
        self._usable: dict[str, bool] = {}
        kept = self.studies / ".ppgseg"  # drawn slices and last results, kept in the datastore across restarts
        self.results, self.drawn = LastResults(kept), DrawnSlices(kept)

    # --- weights -------------------------------------------------------------------------------------------------
    def base_weights(self) -> tuple[Path | None, str, list[str]]:
        """The PPG weights to start from: (path or None, description, stamps of the studies they were trained on)."""
        if self.explicit_ppg is not None:
            return self.explicit_ppg, f"--conf ppg_checkpoint {self.explicit_ppg}", []
        if self.trained.is_file():
            info = self.trained.with_suffix(".json")  # written before the weights are replaced
            meta = json.loads(info.read_text()) if info.is_file() else {}
            desc = f"trained in this app ({self.trained.name}, {meta.get('finished', '?')})"
            return self.trained, desc, list(meta.get("trained_on", []))
        default = self.bundle / "models" / "model.pt"
        if default.is_file() and (self.backbone, self.preset) == ("litemedsam", "cpu"):
            return default, f"bundle default ({default})", []
        return None, f"untrained PPG (no PPG checkpoint for backbone {self.backbone}, preset {self.preset})", []

    def service(self) -> ProxyPromptService:
        """The shared service; reloads the base weights when the train task has written new ones."""
        with self._lock:
            path, description, trained_on = self.base_weights()
            version = (str(path), path.stat().st_mtime_ns if path else None)
            if self._service is None:
                # SAM 2 runs in video mode: volumes are segmented by propagation through its memory
                model = build_model(self.backbone, self.preset, self.checkpoint, video=self.backbone == "sam2")
                if path is not None:
                    load_ppg(model, path)
                video = isinstance(model, ProxyPromptVideo)
                self._service = ProxyPromptService(
                    model,
                    weights=description,
                    cache_dir=self.model_dir / "cache",
                    segmenter=VideoSegmenter(self.policy) if video else ImageSegmenter(self.policy, self.tile),
                    axis=self.axis,
                    support_slices=self.support_slices,
                    finetune=self.finetune,
                    trained_on=trained_on,
                    encode_cache_bytes=self.encode_cache_bytes,
                )
            elif version != self._loaded and path is not None:
                with self._service.lock:
                    load_ppg(self._service.model, path)
                    self._service.set_weights(description, trained_on)
                logger.info(f"loaded new weights: {description}")
            self._loaded = version
            return self._service

    # --- datastore -----------------------------------------------------------------------------------------------
    def labelled(self, datastore) -> dict[str, Study]:
        """Studies of the datastore with a usable final label (see `usable`)."""
        out = {}
        for image_id in datastore.get_labeled_images():
            label = datastore.get_label_uri(image_id, "final")
            if label:
                study = Study(image_id, Path(datastore.get_image_uri(image_id)), Path(label))
                if self.usable(study):
                    out[image_id] = study
        return out

    def usable(self, study: Study) -> bool:
        """Whether a stored final label can support others: readable, the image's size, one object at least.
        Uploads are checked (`lib/datastore.py`); a file put there by hand is skipped with a warning, so that it never
        breaks another request. Cached per file version."""
        try:
            key = study.stamp()
        except OSError:
            return False
        if key not in self._usable:
            try:
                label, image = read_image(study.label), read_image(study.image)
                problem = None
                if tuple(label.shape[1:]) != tuple(image.shape[1:]):
                    problem = f"its size {tuple(label.shape[1:])} is not the image's {tuple(image.shape[1:])}"
                elif not bool(label.as_tensor().any()):
                    problem = "it is empty"
            except ValueError as err:
                problem = str(err)
            if problem:
                logger.warning(f"final label of {study.id} ({study.label}) is not used as support: {problem}")
            self._usable[key] = problem is None
        return self._usable[key]

    def slice_axis(self, image) -> int:
        """The slicing axis of a volume: ``--conf axis``, or with ``auto`` its thickest spacing."""
        return slice_axis(image, self.axis) if self.auto_axis else self.axis

    @staticmethod
    def result_key(request: dict) -> str:
        """The image a request is about: its datastore id, else its file (a session's image)."""
        return str(request.get("image_id") or request["image"])

    def pick_labels(self, value) -> dict[str, int]:
        """The requested labels (names, list or comma string) -> {name: value}; all labels when not given."""
        if value in (None, "", []):
            return dict(self.labels)
        names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n) for n in value]
        unknown = [n for n in names if n not in self.labels]
        if unknown or not names:
            raise bad_request(
                422, f"labels {unknown or names} are not labels of this app; its labels are {list(self.labels)}"
            )
        return {n: self.labels[n] for n in names}
