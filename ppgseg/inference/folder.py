"""Folder inference: every image, volume or DICOM series of a folder segmented from one support set, each label
written with its input's size and geometry."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import LoadImage

from ..checkpoint import weights_loaded
from ..data.contract import read_split
from ..io import label_suffix, list_inputs, read_image, read_label, stem, write_label
from ..modeling.generator import SupportEmbedding
from ..modeling.proxy_sam import ProxyPromptSAM
from .atlas import AtlasRegistration
from .policy import EVERY_SLICE, DecodePolicy
from .slices import segment_image
from .support import SupportSet
from .tiles import support_tile
from .volume import Atlas, encoded_slices, register_atlases, segment_atlases, to_volume

if TYPE_CHECKING:  # training builds on inference: imported where used
    from ..training.registered import RegistrationFineTune

logger = logging.getLogger("ppgseg")


class FolderSegmenter:
    """Segments every image or volume of a folder from one support set, encoded once.

    Writes one label map per input into ``output_dir``, named after the input, with its size and geometry (the
    input's affine); values are the support's label ids. 2D images keep their format (PNG/JPG inputs give PNG);
    volumes are segmented slice by slice along ``axis`` and written as NIfTI. An input that cannot be read or
    segmented is reported and skipped; the others are still written. ``inferer`` runs the model on each image or
    slice (MONAI's `SimpleInferer` by default; `NativeTileInferer` segments images larger than the encoder input in
    overlapping native-resolution tiles, the support cut into the same tiles and encoded once). ``policy``: how masks
    are decoded (`DecodePolicy`; every slice, since no encoder features are computed ahead here).

    With ``atlases`` > 0 and labelled volumes in the support folder, a volume is segmented by the registration route
    instead: the first ``atlases`` studies of the support folder's training split are registered onto it
    (``registration``), each slice is prompted by their slices at its position and their vote is the registration
    prompt (`segment_atlases`); the studies are read and encoded once, on the first volume. With ``tune``, the
    route's weights are first fine-tuned on those studies registered onto each other (`RegistrationFineTune`, once,
    with the support's label ids). 2D inputs, and volumes where the support folder holds 2D images, keep the support
    set and the weights as given.
    """

    def __init__(
        self,
        model: ProxyPromptSAM,
        support: SupportSet,
        *,
        axis: int = 2,
        inferer: Inferer | None = None,
        policy: DecodePolicy = EVERY_SLICE,
        atlases: int = 0,
        registration: AtlasRegistration | None = None,
        tune: RegistrationFineTune | None = None,
    ) -> None:
        if atlases < 0:
            raise ValueError(f"atlases must be >= 0 (0: volumes use the support set), got {atlases}")
        self.model, self.support, self.axis, self.policy = model, support, axis, policy
        self.inferer = inferer or SimpleInferer()
        self.loader = LoadImage(image_only=True, ensure_channel_first=True)
        self.atlas_count, self.registration = atlases, registration or AtlasRegistration()
        self._atlases: list[Atlas] | None = None
        self.tune, self._tuned = tune, None  # the registration route's fine-tuned weights, once trained

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

    def atlases(self) -> list[Atlas]:
        """The labelled studies of the registration route, read and encoded on first use; none where the support
        folder holds 2D images (volumes then use the support set, as with ``atlases`` 0)."""
        if self._atlases is None:
            folder, atlases = self.support.folder, []
            for item in read_split(folder, "training")[: self.atlas_count]:
                image = read_image(item["image"], self.loader)
                if image.dim() != 4:
                    logger.info(f"{folder} holds 2D images, not labelled volumes: volumes use the support set")
                    atlases = []
                    break
                label = read_label(item["label"], self.loader)
                atlases.append(Atlas(image, label, encoded_slices(self.model, image, self.axis)))
            self._atlases = atlases
            if self.tune is not None and len(atlases) >= 2 and self.tune.applies(self.model):
                self._tuned = self.tuned(atlases)
        return self._atlases

    def tuned(self, atlases: list[Atlas]) -> dict:
        """The model's weights fine-tuned on ``atlases`` registered onto each other; the model keeps its own."""
        from ..training.finetune import snapshot
        from ..training.registered import RegisteredEpisodes, cross_register

        ids = self.support.label_ids
        registered = cross_register(self.registration, atlases, ids)
        data = RegisteredEpisodes(self.model, atlases, registered, ids, self.axis)
        with weights_loaded(self.model, snapshot(self.model)):
            with torch.enable_grad():
                done = self.tune(self.model, data)
            logger.info(done.describe("weights", len(atlases)))
            return snapshot(self.model)

    def segment_file(self, path: Path, output_dir: Path, embedding: SupportEmbedding) -> Path:
        image = read_image(path, self.loader)
        if self.atlas_count and image.dim() == 4 and self.atlases():
            label = self.segment_registered(image)
            return write_label(label, image, output_dir, stem(path), label_suffix(path, image))
        label = segment_image(
            self.model, image, embedding, self.support.label_ids, axis=self.axis, policy=self.policy,
            inferer=self.inferer,
        )  # fmt: skip
        return write_label(label, image, output_dir, stem(path), label_suffix(path, image))

    def segment_registered(self, image: MetaTensor) -> torch.Tensor:
        """The (*spatial) label map of a volume by the registration route."""
        atlases, ids = self.atlases(), self.support.label_ids
        volume = encoded_slices(self.model, image, self.axis)
        registered = register_atlases(self.registration, image, atlases, ids)
        with weights_loaded(self.model, self._tuned):
            label = segment_atlases(self.model, image, volume, atlases, registered, ids, self.axis)
        return to_volume(label, self.axis)
