"""Folder inference: every image, volume or DICOM series of a folder segmented from one support set, each label
written with its input's size and geometry."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import LoadImage

from ..io import label_suffix, list_inputs, read_image, stem, write_label
from ..modeling.generator import SupportEmbedding
from ..modeling.proxy_sam import ProxyPromptSAM
from .policy import EVERY_SLICE, DecodePolicy
from .slices import segment_image
from .support import SupportSet
from .tiles import support_tile

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
    """

    def __init__(
        self,
        model: ProxyPromptSAM,
        support: SupportSet,
        *,
        axis: int = 2,
        inferer: Inferer | None = None,
        policy: DecodePolicy = EVERY_SLICE,
    ) -> None:
        self.model, self.support, self.axis, self.policy = model, support, axis, policy
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
            self.model, image, embedding, self.support.label_ids, axis=self.axis, policy=self.policy,
            inferer=self.inferer,
        )  # fmt: skip
        return write_label(label, image, output_dir, stem(path), label_suffix(path, image))
