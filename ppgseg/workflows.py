"""What the bundle's configs build: the support set of a data-contract folder, the episodic trainer and the few-shot
evaluator on MONAI's ignite engines, the PPG checkpoint and metrics handlers, and folder inference that keeps each
input's size and geometry."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer, SimpleInferer
from monai.metrics import compute_dice
from monai.transforms import LoadImage, SaveImage
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .backbones.base import Features
from .checkpoint import save_ppg
from .data.contract import Sample, load_samples, read_labels, read_split
from .data.episodes import subject_of, to_byte_range
from .lora import merged_lora
from .modeling.generator import Selected, SupportEmbedding
from .modeling.proxy_sam import ProxyPromptSAM
from .tiling import support_tile, tile_samples
from .training import encoder_frame

logger = logging.getLogger("ppgseg")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".mha", ".dcm")
COLORS = np.array([[255, 60, 60], [60, 160, 255], [80, 220, 80], [250, 210, 40], [200, 80, 220]], np.float32)


def select_objects(labels: dict[int, str], objects: Sequence[str] | str | None, where: str) -> dict[int, str]:
    """The label ids and names to segment: all of ``labels`` when ``objects`` is None, else those named (in that
    order). Unknown names raise ValueError naming ``where`` and the known names."""
    if objects is None:
        return dict(labels)
    names = [objects] if isinstance(objects, str) else list(objects)
    if not names:
        raise ValueError(f"objects is empty: name at least one of {sorted(labels.values())} (or null for all)")
    by_name = {v: k for k, v in labels.items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"objects {unknown} are not labels of {where}; its labels are {sorted(by_name)}")
    return {by_name[n]: n for n in names}


def split_samples(
    folder: str | Path, split: str, *, axis: int = 2, max_slices: int | None = None, tile: int | None = None
) -> list[Sample]:
    """The 2D samples of one split of a data-contract folder (with ``tile``: cut into native-resolution tiles of
    that side, training crops for images larger than the encoder input); an empty split is an error naming it."""
    samples = load_samples(read_split(folder, split), axis=axis, max_slices=max_slices)
    if not samples:
        raise ValueError(f"{Path(folder) / 'dataset.json'}: the {split!r} list has no labelled image")
    return tile_samples(samples, tile) if tile else samples


class SupportSet:
    """K labelled pairs of a data-contract folder's ``training`` list that show the requested objects.

    Pairs that show every requested object are preferred, one per study first (slices of one volume are one study),
    in a random order fixed by ``seed``.

    Args:
        folder: a data-contract folder.
        num_support: K.
        objects: label names to segment (None: all of the folder's labels).
        axis: slicing axis for 3D studies.
    """

    def __init__(
        self,
        folder: str | Path,
        num_support: int,
        *,
        objects: Sequence[str] | str | None = None,
        axis: int = 2,
        seed: int = 0,
        split: str = "training",
    ) -> None:
        if num_support < 1:
            raise ValueError(f"num_support must be >= 1, got {num_support}")
        self.folder = Path(folder)
        self.objects = select_objects(read_labels(folder), objects, str(self.folder / "dataset.json"))
        samples = split_samples(folder, split, axis=axis)
        ids = list(self.objects)
        shows = [s.shows(ids) for s in samples]
        rng = np.random.default_rng(seed)
        order = [int(i) for i in rng.permutation(len(samples))]
        order.sort(key=lambda i: -len(shows[i]))  # stable: most objects first, random among equals
        chosen, studies = [], set()
        for i in order:  # one pair per study first
            if len(chosen) < num_support and subject_of(samples[i]) not in studies and shows[i]:
                chosen.append(i)
                studies.add(subject_of(samples[i]))
        chosen += [i for i in order if i not in chosen and shows[i]][: num_support - len(chosen)]
        missing = [self.objects[o] for o in ids if not any(o in shows[i] for i in chosen)]
        if missing:
            raise ValueError(
                f"{self.folder / 'dataset.json'}: no {split} pair shows {missing}, so the support set cannot show "
                f"what to segment; label it in at least one pair or leave it out of objects"
            )
        self.samples = [samples[i] for i in chosen]

    @property
    def label_ids(self) -> list[int]:
        return list(self.objects)

    @property
    def names(self) -> list[str]:
        return list(self.objects.values())

    def sources(self) -> list[str]:
        return [s.source for s in self.samples]

    def encode(self, model: ProxyPromptSAM, *, tile: int | None = None) -> SupportEmbedding:
        """The support embedding; with ``tile``, of the pairs cut into native-resolution tiles (`tiling`)."""
        samples = tile_samples(self.samples, tile) if tile else self.samples
        return encode_samples(model, samples, self.label_ids)


def encode_samples(model: ProxyPromptSAM, samples: Sequence[Sample], label_ids: Sequence[int]) -> SupportEmbedding:
    """Encode labelled samples as a support set for ``label_ids`` (each pair brought into the encoder's frame on its
    own, so sizes may differ)."""
    pairs = [encoder_frame(model.backbone, to_byte_range(s.image), s.masks(list(label_ids))) for s in samples]
    x, m = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    with torch.no_grad():
        return model.encode_prepared_support(x, m, model.encode_images(x))


class TargetDataset(Dataset):
    """The labelled targets of one split: dicts of image (C, H, W) in [0, 255], label (N, H, W) one channel per
    requested object, and source. Use with ``DataLoader(batch_size=None)``."""

    def __init__(self, folder: str | Path, label_ids: Sequence[int], *, split: str = "test", axis: int = 2) -> None:
        self.samples, self.label_ids = split_samples(folder, split, axis=axis), list(label_ids)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        return {"image": to_byte_range(s.image), "label": s.masks(self.label_ids), "source": s.source}


# --- engines -------------------------------------------------------------------------------------------------------
def episode_step(engine: Engine, episode: dict) -> dict:
    """The trainer's iteration (``iteration_update`` of MONAI's SupervisedTrainer): one episode, one SGD step."""
    engine.network.train()
    logits, truth = engine.network(episode)
    loss = engine.loss_function(logits, truth)
    engine.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    engine.optimizer.step()
    return {"pred": logits.detach(), "label": truth, "loss": loss.detach()}


class FewShotEvaluator(SupervisedEvaluator):
    """Segments every target of ``val_data_loader`` from one support set, encoded once per run with the weights of
    that moment. Outputs per target: image, pred and label (1, N, H, W) binary, source. The ``inferer`` runs the
    model on each target (`NativeTileInferer`: native-resolution tiles, the support cut into the same tiles)."""

    def __init__(self, *, network: ProxyPromptSAM, support: SupportSet, **kwargs) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(network=network, **kwargs)
        self.support = support
        self.add_event_handler(Events.EPOCH_STARTED, self._encode_support)

    def _encode_support(self, engine: Engine) -> None:
        self.network.eval()
        with torch.no_grad():
            engine.state.support = self.encode_support()

    def encode_support(self):
        return self.support.encode(self.network, tile=support_tile(self.inferer))

    def segment(self, image: Tensor, support) -> Tensor:
        """(C, H, W) target -> (1, N, H, W) logits, through the evaluator's inferer."""
        return self.inferer(image[None], lambda x: self.network.segment(x, support))

    def _iteration(self, engine: Engine, batchdata: dict) -> dict:
        with torch.no_grad():
            logits = self.segment(batchdata["image"].to(engine.state.device), engine.state.support)
        label = batchdata["label"]
        return {
            "image": batchdata["image"],
            "pred": (logits > 0).float().cpu(),
            "label": label if label.dim() == logits.dim() else label[None],
            "source": batchdata["source"],
        }


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


def overlay(image: Tensor, masks: Tensor) -> np.ndarray:
    """(C, H, W) image in [0, 255], (N, H, W) binary masks -> (H, W, 3) uint8 with translucent coloured masks."""
    out = to_byte_range(image).permute(1, 2, 0).numpy().astype(np.float32).copy()
    for n, m in enumerate(masks.cpu().numpy().astype(bool)):
        out[m] = 0.5 * out[m] + 0.5 * COLORS[n % len(COLORS)]
    return out.clip(0, 255).astype(np.uint8)


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


# --- inference -----------------------------------------------------------------------------------------------------
def list_inputs(input_dir: str | Path) -> list[Path]:
    """Image files and DICOM series folders directly in ``input_dir``."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"input_dir {folder} is not a folder")
    found = sorted(
        p for p in folder.iterdir() if (p.is_dir() and any(p.iterdir())) or (p.is_file() and not p.name.startswith("."))
    )
    if not found:
        raise ValueError(f"input_dir {folder} is empty: expected images ({', '.join(IMAGE_SUFFIXES)}) or DICOM series")
    return found


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix.lower()


class FolderSegmenter:
    """Segments every image or volume of a folder from one support set, encoded once.

    Writes one label map per input into ``output_dir``, named after the input, with its size and geometry (the
    input's affine); values are the support's label ids. 2D images keep their format (PNG/JPG inputs give PNG);
    volumes are segmented slice by slice along ``axis`` and written as NIfTI. An input that cannot be read or
    segmented is reported and skipped; the others are still written. ``inferer`` runs the model on each image or
    slice (MONAI's `SimpleInferer` by default; `NativeTileInferer` segments images larger than the encoder input in
    overlapping native-resolution tiles, the support cut into the same tiles and encoded once). ``box_refine``: each
    mask refined by a second pass prompted with its own box (`ProxyPromptSAM.refine_with_box`).
    """

    def __init__(
        self,
        model: ProxyPromptSAM,
        support: SupportSet,
        *,
        axis: int = 2,
        chunk: int = 8,
        inferer: Inferer | None = None,
        box_refine: bool = False,
    ) -> None:
        self.model, self.support, self.axis, self.chunk = model, support, axis, chunk
        self.box_refine = box_refine
        self.inferer = inferer or SimpleInferer()
        self.loader = LoadImage(image_only=True, ensure_channel_first=True)

    def __call__(self, inputs: str | Path | Sequence[str | Path], output_dir: str | Path) -> dict:
        """Segment ``inputs`` (a folder, or a list of its entries as `list_inputs` gives them) into ``output_dir``."""
        input_dir = inputs if isinstance(inputs, str | Path) else "the given list"
        inputs = list_inputs(inputs) if isinstance(inputs, str | Path) else [Path(p) for p in inputs]
        if not inputs:
            raise ValueError("no input to segment: the list of inputs is empty")
        self.model.eval()
        with torch.no_grad():
            support = self.encode_support()
        logger.info(f"support: {len(self.support.samples)} pairs {self.support.names} from {self.support.folder}")
        written, failed = {}, {}
        for name, paths in self.group(inputs).items():
            try:
                written[name] = self.segment_files(paths, Path(output_dir), support)
                logger.info(f"{name} -> {written[name]}")
            except Exception as err:  # one bad input must not stop the batch
                failed[name] = f"{type(err).__name__}: {err}"
                logger.error(f"skipped {name}: {failed[name]}")
        report = {"written": written, "failed": failed, "objects": self.support.objects}
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "inference_report.json").write_text(json.dumps(report, indent=2, default=str))
        if not written:
            raise RuntimeError(f"no input of {input_dir} could be segmented: {failed}")
        return report

    def encode_support(self) -> SupportEmbedding:
        return self.support.encode(self.model, tile=support_tile(self.inferer))

    def group(self, inputs: list[Path]) -> dict[str, list[Path]]:
        """What is segmented as one unit: here every input on its own."""
        return {str(p): [p] for p in inputs}

    def segment_files(self, paths: list[Path], output_dir: Path, embedding: SupportEmbedding) -> str:
        return str(self.segment_file(paths[0], output_dir, embedding))

    def segment_file(self, path: Path, output_dir: Path, embedding: SupportEmbedding) -> Path:
        image = read_image(path, self.loader)
        label = segment_image(
            self.model, image, embedding, self.support.label_ids, axis=self.axis, chunk=self.chunk,
            inferer=self.inferer, box_refine=self.box_refine,
        )  # fmt: skip
        return write_label(label, image, output_dir, stem(path), label_suffix(path, image))


def stem(path: Path) -> str:
    """An input's name without its suffix (a DICOM series folder: its name)."""
    return path.name[: -len(_suffix(path))] if path.is_file() else path.name


def label_suffix(path: Path, image: Tensor) -> str:
    """How the label of input ``path`` is written: 2D images as PNG; volumes keep .nii, .nii.gz, .nrrd or .mha,
    anything else (DICOM) becomes .nii.gz."""
    if image.dim() == 3 and _suffix(path) in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        return ".png"
    return _suffix(path) if _suffix(path) in (".nii", ".nii.gz", ".nrrd", ".mha") else ".nii.gz"


def read_image(path: str | Path, loader: LoadImage | None = None) -> MetaTensor:
    """A 2D image or 3D volume (C, *spatial) with its metadata; an unreadable file is a ValueError naming it."""
    loader = loader or LoadImage(image_only=True, ensure_channel_first=True)
    try:
        return loader(str(path))
    except Exception as err:  # MONAI raises several types for unreadable files
        raise ValueError(f"{path} is not a readable image or DICOM series ({err})") from err


def segment_image(
    model: ProxyPromptSAM,
    image: Tensor,
    embedding: SupportEmbedding,
    label_ids: Sequence[int],
    *,
    axis: int = 2,
    chunk: int = 8,
    skip: Sequence[int] = (),
    inferer: Inferer | None = None,
    features: Features | None = None,
    min_carried: float = 0.0,
    box_refine: bool = False,
    z_stride: int = 1,
) -> Tensor:
    """Label map (spatial shape of ``image``, uint8 label ids) of a 2D image or a 3D volume (C, *spatial) as read.

    2D images are segmented in file orientation (readers give (W, H)), as training sees them; volumes slice by slice
    along ``axis``, the support encoded once. Slices in ``skip`` are left 0 (the caller fills them). ``inferer``: see
    `label_slices`. ``features``: the encoder's features of every slice of a volume (`encode_slices`), computed
    earlier; then only the PPG and the decoder run. ``min_carried``, ``box_refine``: see
    `ProxyPromptSAM.segment_features`. ``z_stride`` > 1: a volume's slices decoded sparsely, from ``features``
    (`sparse_slice_logits`); 2D images ignore it."""
    spatial = image.shape[1:]
    options = {"chunk": chunk, "inferer": inferer, "min_carried": min_carried, "box_refine": box_refine}
    if len(spatial) == 2:
        return label_slices(model, as_slices(image, axis), embedding, label_ids, **options)[0].T
    if len(spatial) != 3:
        raise ValueError(f"expected a 2D image or a 3D volume, got spatial shape {tuple(spatial)}")
    if not 0 <= axis <= 2:
        raise ValueError(f"axis must be 0, 1 or 2 for a volume, got {axis}")
    slices = as_slices(image, axis)  # (Z, C, a, b)
    if features is not None and features.embed.shape[0] != len(slices):
        raise ValueError(f"features of {features.embed.shape[0]} slices for a volume of {len(slices)} slices")
    todo = [z for z in range(len(slices)) if z not in set(skip)]
    out = torch.zeros((len(slices), *slices.shape[2:]), dtype=torch.uint8)
    if todo:
        out[todo] = label_slices(
            model, slices[todo], embedding, label_ids, features=None if features is None else features.select(todo),
            z_stride=z_stride, positions=todo, **options,
        )  # fmt: skip
    return out.movedim(0, axis)


def encode_slices(model: ProxyPromptSAM, image: Tensor, axis: int, lock=None) -> Features:
    """The encoder's features of every slice of a volume (C, *spatial) along ``axis``, as `segment_image` would
    compute them, on the CPU. ``lock`` (e.g. a service's) is held for each slice only, so others can use the model in
    between."""
    parts = []
    for s in as_slices(image, axis):
        x, _ = model.backbone.preprocess(to_byte_range(s)[None])
        with lock or contextlib.nullcontext():
            f = model.encode_images(x)
        parts.append(f.to("cpu"))
    return Features.cat(parts)


def as_slices(image: Tensor, axis: int) -> Tensor:
    """(C, *spatial) as read -> (Z, C, H, W) slices along ``axis``; a 2D image is one slice in file orientation
    (readers give (W, H))."""
    data = image.as_tensor() if isinstance(image, MetaTensor) else image
    if data.dim() == 3:
        return data.transpose(-1, -2)[None]
    return data.movedim(axis + 1, 0)


def label_slices(
    model: ProxyPromptSAM,
    slices: Tensor,
    embedding: SupportEmbedding,
    label_ids: Sequence[int],
    *,
    chunk: int = 8,
    inferer: Inferer | None = None,
    features: Features | None = None,
    min_carried: float = 0.0,
    box_refine: bool = False,
    z_stride: int = 1,
    positions: Sequence[int] | None = None,
) -> Tensor:
    """(Z, C, H, W) -> (Z, H, W) label map: at each pixel the label id of the most confident object with a positive
    logit, 0 where none is. ``inferer`` runs the model (MONAI's `SimpleInferer` by default; `NativeTileInferer`
    for native-resolution tiles). ``features``: the slices' encoder features, computed earlier (one pass only).
    ``min_carried``, ``box_refine``: see `ProxyPromptSAM.segment_features`. ``z_stride`` > 1 (with ``features``):
    decode a volume's slices sparsely (`sparse_slice_logits`; ``positions``: the slices' indices in the volume).
    LoRA adapters are merged while it runs (`merged_lora`)."""
    if features is not None and inferer is not None:
        raise ValueError("features computed earlier serve one pass over each slice, not an inferer's tiles")
    if z_stride < 1:
        raise ValueError(f"z_stride must be >= 1, got {z_stride}")
    if z_stride > 1 and features is None:
        raise ValueError("z_stride > 1 needs the slices' encoder features computed earlier (features=...)")
    inferer = inferer or SimpleInferer()
    geo = model.backbone.geometry(tuple(slices.shape[-2:]))
    device = model.backbone.device
    options = {"min_carried": min_carried, "box_refine": box_refine}
    out = []
    with torch.no_grad(), merged_lora(model):
        if z_stride > 1:
            low = sparse_slice_logits(model, features, embedding, stride=z_stride, positions=positions, chunk=chunk,
                                      **options)  # fmt: skip
        for start in range(0, len(slices), chunk):
            if z_stride > 1:
                logits = model.backbone.postprocess(low[start : start + chunk].to(device), geo)
            elif features is None:
                part = torch.stack([to_byte_range(s) for s in slices[start : start + chunk]])
                logits = inferer(part, lambda x: model.segment(x, embedding, **options))
            else:
                f = features.select(slice(start, start + chunk)).to(device)
                logits = model.backbone.postprocess(model.segment_features(f, embedding, **options), geo)
            out.append(to_label(logits.cpu(), label_ids))  # (z, N, H, W) logits
    return torch.cat(out)


Z_AGREE = 0.7  # `sparse_slice_logits`: the mask Dice at which two decoded slices count as agreeing


def sparse_slice_logits(
    model: ProxyPromptSAM,
    features: Features,
    embedding: SupportEmbedding,
    *,
    stride: int,
    min_carried: float = 0.0,
    box_refine: bool = False,
    positions: Sequence[int] | None = None,
    chunk: int = 8,
    agree: float = Z_AGREE,
) -> Tensor:
    """(Z, N, 4h, 4w) low-res logits (CPU) of a volume's Z slices from their encoder features, with fewer decodes.

    The PPG's Selective map runs on every slice; its CCM and the mask decoder (the costly parts) run only for the
    (slice, object) pairs decoded: first every ``stride``-th slice and the last. Then, object by object, each gap
    between two decoded slices is either filled or split: where the two masks agree (Dice >= ``agree``, or both
    empty) the slices between get the logits interpolated linearly between the two ends; otherwise the middle slice
    is decoded and both halves are looked at again, down to neighbouring slices. An object
    the support carries to no part of a slice (``min_carried``) is background there, as with every slice decoded.
    Each round's decodes are batched per slice. ``positions``: each row's slice index in the volume (default
    0..Z-1), which sets the interpolation weights where rows are not evenly spaced (slices left out in between).
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    z = features.embed.shape[0]
    pos = torch.arange(z, dtype=torch.float32) if positions is None else torch.tensor(positions, dtype=torch.float32)
    if len(pos) != z:
        raise ValueError(f"{len(pos)} positions for {z} slices")
    device = model.backbone.device
    selected = Selected.cat(
        [model.select(features.select(slice(s, s + chunk)).to(device), embedding) for s in range(0, z, chunk)]
    )
    coarse = selected.coarse
    keep = model.carried(coarse, min_carried).cpu()  # (Z, N)
    n, side = keep.shape[1], 4 * features.embed.shape[-1]
    logits = torch.full((z, n, side, side), -20.0)
    tokens, colorized = None, torch.zeros_like(keep)  # the CCM runs on the pairs that get decoded only

    def decode(asked: Tensor) -> None:  # (Z, N) bool: the pairs to decode now
        nonlocal tokens, colorized
        asked = asked & keep
        tokens = model.tokens(selected, (asked & ~colorized).to(device), tokens)
        colorized |= asked
        rows = asked.any(1).nonzero()[:, 0].tolist()
        for s in range(0, len(rows), chunk):
            at = rows[s : s + chunk]
            f = features.select(at).to(device)
            low, _ = model.decode_kept(f, tokens[at], coarse[at], asked[at].to(device))
            if box_refine and model.route.uses_decoder:
                low = model.refine_with_box(f, low)
            logits[at] = torch.where(asked[at][..., None, None], low.cpu(), logits[at])

    anchors = sorted({*range(0, z, stride), z - 1})
    first = torch.zeros_like(keep)
    first[anchors] = True
    decode(first)
    gaps = [(a, b, o) for a, b in itertools.pairwise(anchors) if b - a > 1 for o in range(n)]
    while gaps:
        asked, split = torch.zeros_like(keep), []
        for a, b, o in gaps:
            if _mask_dice(logits[a, o] > 0, logits[b, o] > 0) >= agree:
                w = ((pos[a + 1 : b] - pos[a]) / (pos[b] - pos[a]))[:, None, None]
                logits[a + 1 : b, o] = torch.where(
                    keep[a + 1 : b, o, None, None], (1 - w) * logits[a, o] + w * logits[b, o], -20.0
                )
            else:
                m = (a + b) // 2
                asked[m, o] = True
                split += [(a, m, o), (m, b, o)]
        decode(asked)
        gaps = [g for g in split if g[1] - g[0] > 1]
    return logits


def _mask_dice(a: Tensor, b: Tensor) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


def to_label(logits: Tensor, label_ids: Sequence[int]) -> Tensor:
    """(Z, N, H, W) logits -> (Z, H, W) uint8 label map: at each pixel the label id of the most confident object with
    a positive logit, 0 where none is."""
    ids = torch.tensor([0, *label_ids], dtype=torch.uint8)
    best = logits.max(dim=1)
    return ids[torch.where(best.values > 0, best.indices + 1, 0)]


def write_label(label: Tensor, image: MetaTensor, output_dir: str | Path, name: str, ext: str = ".nii.gz") -> Path:
    """Write a label map with the geometry (affine, spacing) of the image it was segmented from, as
    ``output_dir/name + ext`` (MONAI's SaveImage)."""
    out = MetaTensor(label[None].to(torch.uint8), meta=image.meta)
    out.meta["filename_or_obj"] = str(Path(output_dir) / name)
    saver = SaveImage(
        output_dir=output_dir,
        output_postfix="",
        output_ext=ext,
        output_dtype=np.uint8,
        resample=False,
        separate_folder=False,
        print_log=False,
    )
    saver(out)
    return Path(output_dir) / f"{name}{ext}"
