"""The volume protocol: a data-contract folder of labelled volumes, its ``test`` studies segmented in two modes, each
method and peer on the same studies, Dice per study and label.

- ``studies``: K labelled studies of the ``training`` list (the first K of one seeded order, so each K's studies
  hold the smaller K's) segment a new study.
- ``drawn``: n slices of the study itself, spread over the object's extent, segment the rest of it (Dice on the
  slices not drawn).

Results are written after every study and a run picks up where an earlier one stopped (`VolumeProtocol.run`)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import weights_loaded
from ..data.contract import read_labels, read_split
from ..inference.atlas import AtlasRegistration, Registered, fuse, to_sitk
from ..inference.slices import as_slices
from ..inference.volume import (
    Atlas,
    EncodedVolume,
    LabelledSlices,
    byte_volume,
    encode_volume,
    one_component,
    propagate,
    segment_registered,
    segment_slices,
)
from ..io import read_image
from ..modeling.proxy_sam import ProxyPromptSAM
from ..training.finetune import snapshot
from ..training.propagation import drawn_positions
from ..training.registered import RegisteredEpisodes, RegistrationFineTune, cross_register
from .baselines.volume import UNetPeer, box_slices, interpolate_slices, nearest_copy, registered_slices

logger = logging.getLogger(__name__)


@dataclass
class VolumeStudy:
    """One study: ``image`` (X, Y, Z) float, ``label`` (X, Y, Z) uint8, voxel ``spacing`` (x, y, z)."""

    id: str
    image: Tensor
    label: Tensor
    spacing: tuple[float, float, float]

    @staticmethod
    def read(item: dict) -> VolumeStudy:
        image, label = read_image(item["image"]), read_image(item["label"])
        if image.shape[1:] != label.shape[1:] or image.dim() != 4:
            raise ValueError(f"{item['image']}: expected a 3D image and a label of its shape, got "
                             f"{tuple(image.shape)} and {tuple(label.shape)}")  # fmt: skip
        spacing = tuple(float(s) for s in image.pixdim[:3])
        name = Path(item["image"]).name.split(".")[0]
        return VolumeStudy(name, image.as_tensor()[0].float(), label.as_tensor()[0].round().to(torch.uint8), spacing)


BUNDLE_WEIGHTS = Path(__file__).resolve().parents[2] / "bundle" / "models" / "model.pt"  # in a checkout


def volume_parser(doc: str, folder_help: str, weights_help: str) -> argparse.ArgumentParser:
    """The command line the volume scripts share: the data-contract ``folder``, the model (PPG weights default: the
    bundle's), the slicing axis, the slice-feature cache and the seed."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help=folder_help)
    p.add_argument("--ppg-checkpoint", type=Path, default=BUNDLE_WEIGHTS, help=weights_help)
    p.add_argument("--backbone", default="litemedsam")
    p.add_argument("--checkpoint", default=None, help="the backbone's weights (SAM / SAM 2)")
    p.add_argument("--axis", type=int, default=2, help="slicing axis of the (X, Y, Z) volumes")
    p.add_argument("--cache", type=Path, default=Path(".cache/volumes"), help="slice features kept per study")
    p.add_argument("--seed", type=int, default=0)
    return p


def encoded_study(model: ProxyPromptSAM, study: VolumeStudy, axis: int, cache_dir: Path | None) -> EncodedVolume:
    """``study``'s slices along ``axis`` encoded (`encode_volume`), kept in ``cache_dir`` by study id (None: not
    kept)."""
    path = None if cache_dir is None else Path(cache_dir) / f"{study.id}_axis{axis}.pt"
    if path is not None and path.is_file():
        return torch.load(path, weights_only=False)
    enc = encode_volume(model, study.image[None], axis)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(enc, path)
    return enc


def dice(pred: Tensor, truth: Tensor, label_ids: Sequence[int], keep: Tensor | None = None) -> dict[int, float]:
    """Dice per label id over the voxels in ``keep`` (all by default); 1 where both are empty."""
    if keep is not None:
        pred, truth = pred[keep], truth[keep]
    out = {}
    for i in label_ids:
        p, t = pred == i, truth == i
        total = int(p.sum()) + int(t.sum())
        out[i] = 1.0 if total == 0 else 2 * int((p & t).sum()) / total
    return out


def fixed_rows(bank: LabelledSlices, k: int, count: int = 3) -> list[int]:
    """The app's fixed supports: of each of the first ``k`` studies, ``count`` evenly spaced slices among those that
    show an object (first, middle and last for 3), the same for every target slice."""
    rows = []
    for s in range(k):
        shown = ((bank.study == s) & (bank.masks.flatten(1).amax(1) > 0)).nonzero()[:, 0]
        pick = np.linspace(0, len(shown) - 1, min(count, len(shown))).round().astype(int)
        rows += [int(shown[i]) for i in pick]
    return rows


class VolumeProtocol:
    """Run the volume protocol on a data-contract folder.

    Args:
        model: the PPG model (its backbone's encoder frozen: slice features are cached per study).
        folder: data-contract folder with ``training`` and ``test`` lists of volumes.
        out_dir: where ``results.json`` is written (and read back to resume).
        axis: slicing axis.
        ks: numbers of labelled studies (empty: no labelled-studies mode).
        drawn: numbers of drawn slices (empty: no drawn mode).
        limit: test studies to run (the first ones of the list); None: all.
        unet_seconds: the 3D UNet's training budget per K (0: no UNet row).
        cache_dir: where slice features are kept per study (None: not kept).
        seed: the seeded order of the labelled studies.
        registration: the multi-atlas registration (default `AtlasRegistration()`).
        tune: the registration route's on-the-fly fine-tune on the K studies, for each K >= 2 (None: no such row).
    """

    def __init__(
        self, model: ProxyPromptSAM, folder: str | Path, out_dir: str | Path, *, axis: int = 2,
        ks: Sequence[int] = (1, 2, 5, 10), drawn: Sequence[int] = (1, 2, 3), limit: int | None = None,
        unet_seconds: float = 120.0, cache_dir: str | Path | None = None, seed: int = 0,
        registration: AtlasRegistration | None = None, tune: RegistrationFineTune | None = None,
    ) -> None:  # fmt: skip
        if model.encoder_trains:
            raise ValueError("the volume protocol caches slice features: the model's encoder must be frozen")
        self.model, self.folder, self.out_dir, self.axis = model, Path(folder), Path(out_dir), axis
        self.ks, self.drawn, self.limit, self.unet_seconds = sorted(ks), sorted(drawn), limit, unet_seconds
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.labels = read_labels(folder)
        self.label_ids = list(self.labels)
        if self.label_ids != list(range(1, len(self.label_ids) + 1)):
            raise ValueError(f"{self.folder / 'dataset.json'}: label ids must be 1..N, got {self.label_ids}")
        order = np.random.default_rng(seed).permutation(len(read_split(folder, "training")))
        self.atlas_items = [read_split(folder, "training")[int(i)] for i in order[: max(self.ks, default=0)]]
        self.test_items = read_split(folder, "test")[:limit]
        self.registration = registration or AtlasRegistration()
        self.tune = tune
        self.shown: dict | None = None  # the first test study's predictions at K = 5 and the most drawn slices

    # --- encoding ----------------------------------------------------------------------------------------------
    def encoded(self, study: VolumeStudy) -> EncodedVolume:
        return encoded_study(self.model, study, self.axis, self.cache_dir)

    def slices(self, volume: Tensor) -> Tensor:
        return as_slices(volume[None], self.axis)[:, 0]

    # --- the run -----------------------------------------------------------------------------------------------
    def load(self) -> dict:
        """The results an earlier run wrote."""
        path = self.out_dir / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run the protocol first")
        return json.loads(path.read_text())

    def run(self) -> dict:
        """Every test study in both modes; ``results.json`` rewritten after each study, studies already in it
        skipped."""
        path = self.out_dir / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        results.update(labels={str(k): v for k, v in self.labels.items()}, axis=self.axis, ks=self.ks,
                       fusion=self.registration.fusion,
                       drawn=self.drawn, atlases=[Path(i["image"]).name for i in self.atlas_items])  # fmt: skip
        studies = results.setdefault("studies", {})
        atlases = [VolumeStudy.read(i) for i in self.atlas_items]
        banks = [LabelledSlices.of(self.model, self.encoded(a), a.label, self.label_ids, self.axis, study=s)
                 for s, a in enumerate(atlases)]  # fmt: skip
        unets = self.train_unets(atlases, results) if self.unet_seconds > 0 else {}
        tuned = self.tune_registration(atlases, results) if self.tune is not None else {}
        for t, item in enumerate(self.test_items):
            study = VolumeStudy.read(item)
            if study.id in studies:
                continue
            start = time.perf_counter()
            k = (5 if 5 in self.ks else self.ks[-1]) if self.ks else None
            n = self.drawn[-1] if self.drawn else None
            self.shown = None if t else {"study": study.id, "image": study.image, "truth": study.label, "k": k,
                                         "n": n, "studies": {}, "drawn": {}}  # fmt: skip
            studies[study.id] = {"studies": self.from_studies(study, atlases, banks, unets, tuned) if self.ks else {},
                                 "drawn": self.from_drawn(study)}  # fmt: skip
            logger.info(f"{study.id}: {time.perf_counter() - start:.0f} s")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
            if self.shown is not None:
                torch.save(self.shown, self.out_dir / "overlays.pt")
        return results

    def train_unets(self, atlases: list[VolumeStudy], results: dict) -> dict[int, UNetPeer]:
        unets, steps = {}, results.setdefault("unet_steps", {})
        for k in self.ks:
            data = [(byte_volume(a.image) / 255, a.label) for a in atlases[:k]]
            unets[k] = UNetPeer(len(self.label_ids), seconds=self.unet_seconds).fit(data)
            steps[str(k)] = unets[k].steps
        return unets

    def tune_registration(self, atlases: list[VolumeStudy], results: dict) -> dict[int, dict]:
        """For each K >= 2, the model's weights fine-tuned on the first K studies registered onto each other
        (`RegistrationFineTune`); the model is left with its own weights."""
        base, states = snapshot(self.model), {}
        log = results.setdefault("registration_finetune", {})
        for k in [k for k in self.ks if k >= 2]:
            chosen = atlases[:k]
            start = time.perf_counter()
            as_atlas = [Atlas(a.image[None], a.label, self.encoded(a)) for a in chosen]
            spacings = [a.spacing for a in chosen]
            registered = cross_register(self.registration, as_atlas, self.label_ids, spacings)
            data = RegisteredEpisodes(self.model, as_atlas, registered, self.label_ids, self.axis, spacings)
            done = self.tune(self.model, data)
            states[k] = snapshot(self.model)
            log[str(k)] = {"episodes": done.episodes, "slices": len(data), "check_loss_before": done.before,
                           "check_loss_after": done.after, "kept": done.kept,
                           "seconds": time.perf_counter() - start}  # fmt: skip
            logger.info(f"registration fine-tune, K = {k}: {log[str(k)]}")
            self.model.load_state_dict(base, strict=False)
        return states

    def largest(self, fn, *args, **kwargs) -> Tensor:
        """``fn``'s label map with each label kept to its largest 3D component."""
        return one_component(fn(*args, **kwargs), self.label_ids)

    def score(self, out: dict, method: str, key, pred: Tensor, truth: Tensor, seconds: float, keep=None) -> None:
        d = dice(pred, truth, self.label_ids, keep)
        mode = "drawn" if keep is not None else "studies"
        if self.shown is not None and key in (self.shown["n" if keep is not None else "k"], "all"):
            self.shown[mode][method] = pred.movedim(0, self.axis) if keep is not None else pred
        out.setdefault(method, {})[str(key)] = {**{self.labels[i]: v for i, v in d.items()}, "seconds": seconds}

    def with_weights(self, state: dict, fn, *args, **kwargs):
        """``fn`` run with ``state`` loaded into the model, its own weights back after."""
        with weights_loaded(self.model, state):
            return fn(*args, **kwargs)

    def from_studies(self, study: VolumeStudy, atlases, banks, unets, tuned) -> dict:
        """Every method with K labelled studies, for each K."""
        out: dict = {}
        enc, truth = self.encoded(study), study.label
        fixed = to_sitk(study.image, study.spacing)
        registered: list[Registered] = []
        reg_seconds = []
        for a in atlases:
            r, sec = _timed(self.registration.register, fixed, to_sitk(a.image, a.spacing), a.label.numpy(),
                           self.label_ids)  # fmt: skip
            registered.append(r)
            reg_seconds.append(sec)
        for k in self.ks:
            bank = LabelledSlices.cat(banks[:k])
            equal = [replace(r, weight=None) for r in registered[:k]]
            self.score(out, "registration", k, fuse(equal, self.label_ids), truth, sum(reg_seconds[:k]))
            if self.registration.fusion == "local":
                fused = fuse(registered[:k], self.label_ids)
                self.score(out, "registration_local", k, fused, truth, sum(reg_seconds[:k]))
            m, ids, regs = self.model, self.label_ids, registered[:k]
            spacings = [a.spacing for a in atlases[:k]]
            where = dict(shape=study.image.shape, spacing=study.spacing, atlas_spacings=spacings)
            routes = {
                "ppg_fixed_supports": partial(segment_slices, m, enc, bank, [fixed_rows(bank, k)] * len(enc), ids),
                "ppg_position_supports": partial(
                    self.largest, segment_registered, m, enc, bank, regs, ids, self.axis, prompt=False, **where
                ),
                "ppg_registration_prompt": partial(
                    self.largest, segment_registered, m, enc, bank, regs, ids, self.axis, **where
                ),
            }
            if k in tuned:
                routes["ppg_registration_prompt_tuned"] = partial(self.with_weights, tuned[k], routes[
                    "ppg_registration_prompt"])  # fmt: skip
            for name, route in routes.items():
                pred, sec = _timed(route)
                self.score(out, name, k, pred.movedim(0, self.axis), truth, sec)
            if k in unets:
                pred, sec = _timed(unets[k], byte_volume(study.image) / 255)
                self.score(out, "unet3d", k, pred, truth, sec)
        pred, sec = _timed(box_slices, self.model, enc, self.slices(truth), self.label_ids)
        self.score(out, "litemedsam_gt_box", "all", pred.movedim(0, self.axis), truth, sec)
        return out

    def from_drawn(self, study: VolumeStudy) -> dict:
        """Every method from n drawn slices of the study, for each n (Dice on the other slices)."""
        out: dict = {}
        enc, truth = self.encoded(study), study.label
        per_slice = self.slices(truth)
        bank = LabelledSlices.of(self.model, enc, truth, self.label_ids, self.axis)
        image_slices = self.slices(study.image)
        for n in self.drawn:
            zs = drawn_positions(truth, self.axis, n)
            drawn = {z: per_slice[z] for z in zs}
            keep = torch.ones(len(enc), dtype=torch.bool)
            keep[zs] = False
            keep = keep[(...,) + (None,) * 2].expand(-1, *per_slice.shape[1:])
            m, ids = self.model, self.label_ids
            routes = {
                "nearest_slice_copy": partial(nearest_copy, drawn, len(enc)),
                "interpolation": partial(interpolate_slices, drawn, len(enc), ids),
                "slice_registration": partial(registered_slices, drawn, image_slices, ids),
                "ppg_drawn_fixed_supports": partial(segment_slices, m, enc, bank, [zs] * len(enc), ids),
                "ppg_propagation": partial(self.largest, propagate, m, enc, drawn, ids, slices=image_slices),
            }
            for name, route in routes.items():
                pred, sec = _timed(route)
                self.score(out, name, n, pred, per_slice, sec, keep)
        return out


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start
