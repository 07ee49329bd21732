"""The data contract: an MSD-style folder whose ``dataset.json`` lists image/label pairs and names the labels.

Images are PNG/JPG (grey or RGB), NIfTI 2D or 3D or DICOM series, read with MONAI's ``LoadImage``; labels are
integer label maps, each value one object. 3D studies become 2D samples by slicing along an axis, keeping the
slices that contain an object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage
from torch import Tensor


@dataclass(frozen=True)
class Sample:
    """One 2D image with its label map: image (C, H, W) float as read, label (H, W) int64; ``source`` names it."""

    image: Tensor
    label: Tensor
    source: str

    def masks(self, label_ids: list[int]) -> Tensor:
        """(N, H, W) float binary masks, one per label id in that order."""
        return torch.stack([(self.label == o).float() for o in label_ids])

    def shows(self, label_ids: list[int]) -> set[int]:
        """The label ids among ``label_ids`` that this sample shows."""
        return {o for o in label_ids if bool((self.label == o).any())}


def read_labels(folder: str | Path) -> dict[int, str]:
    """The object labels of a data-contract folder (background excluded), e.g. {1: "optic_disc", 2: "optic_cup"}."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a data-contract folder needs a dataset.json")
    try:
        labels = json.loads(path.read_text())["labels"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f'{path}: expected JSON with a \'labels\' mapping like {{"0": "background", ...}}') from err
    return {int(k): v for k, v in labels.items() if int(k) != 0}


def read_split(folder: str | Path, split: str = "training") -> list[dict[str, str]]:
    """``dataset.json``'s ``split`` list with absolute paths (MONAI's ``load_decathlon_datalist``)."""
    path = Path(folder) / "dataset.json"
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split, base_dir=Path(folder))
    for item in items:
        for key in ("image", "label"):
            if not Path(item[key]).exists():
                raise FileNotFoundError(f"{path}: {split} entry {key} {item[key]} does not exist")
    return items


def load_samples(items: list[dict[str, str]], *, axis: int = 2, max_slices: int | None = None) -> list[Sample]:
    """Read image/label pairs into 2D samples; 3D volumes are sliced along ``axis`` (slices with an object only;
    at most ``max_slices`` of them per volume, evenly spaced, when given)."""
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    samples = []
    for item in items:
        try:
            image, label = loader(item["image"]), loader(item["label"])
        except Exception as err:  # MONAI raises several types for unreadable files
            raise ValueError(f"cannot read {item['image']} / {item['label']} as an image: {err}") from err
        image, label = torch.as_tensor(np.asarray(image)).float(), torch.as_tensor(np.asarray(label))[0].long()
        if image.shape[1:] != label.shape:
            raise ValueError(
                f"label {item['label']} {tuple(label.shape)} does not match image {item['image']} "
                f"{tuple(image.shape[1:])}"
            )
        if label.dim() == 2:
            # LoadImage reads PNGs as (C, W, H): transpose so that H is rows as in the file
            samples.append(Sample(image.transpose(-1, -2), label.T, str(item["image"])))
            continue
        if not 0 <= axis < label.dim():
            raise ValueError(f"axis must be in 0..{label.dim() - 1} for {item['image']}, got {axis}")
        zs = [z for z in range(label.shape[axis]) if label.select(axis, z).any()]
        if max_slices is not None and len(zs) > max_slices:
            zs = [zs[int(i)] for i in np.linspace(0, len(zs) - 1, max_slices).round()]
        for z in zs:
            samples.append(Sample(image.select(axis + 1, z), label.select(axis, z), f"{item['image']}#{axis}:{z}"))
    return samples
