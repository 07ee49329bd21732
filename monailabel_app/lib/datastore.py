"""The studies folder as the app keeps it safe: ids and tags that are names, never paths; submitted labels checked
against their image and stored with the app's label values, whatever order the user's segments had in Slicer."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from ppgseg.io import read_image, write_label

logger = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# segments of Slicer's MONAILabel panel that are not anatomy: its scribble layers and a plain background segment
PANEL_LAYERS = ("foreground_scribbles", "background_scribbles")
NOT_LABELS = ("background", *PANEL_LAYERS)


def refuse(status: int, message: str) -> HTTPException:
    logger.warning(f"HTTP {status}: {message}")
    return HTTPException(status_code=status, detail=message)


def check_name(value: str, what: str) -> str:
    """An image id or label tag must be a plain name: a path (``..``, ``/``, absolute) could write anywhere."""
    if not isinstance(value, str) or not NAME.match(value) or ".." in value:
        raise refuse(400, f"{what} {value!r} is not a plain name (letters, digits, '.', '_', '-'; no path)")
    return value


def segment_values(label_info, key: str) -> dict[int, str]:
    """Slicer's ``label_info`` (``[{"name": ..., key: value}]``) -> {value in the uploaded labelmap: segment name}."""
    if not isinstance(label_info, list) or not all(isinstance(s, dict) and "name" in s for s in label_info):
        raise refuse(400, f'label_info must be a list of {{"name", "{key}"}} entries, got {label_info!r}')
    try:
        return {int(s[key]): str(s["name"]) for s in label_info if key in s}
    except (TypeError, ValueError) as err:
        raise refuse(400, f"label_info: {key} must be whole numbers ({err})") from None


def to_app_values(label: np.ndarray, names: dict[int, str], labels: dict[str, int], where: str) -> np.ndarray:
    """Relabel an uploaded labelmap from segment positions to the app's label values, by segment name. Segments
    that are not anatomy (background, the panel's scribble layers) become 0; other unknown names are refused."""
    present = sorted(int(v) for v in np.unique(label) if v != 0)
    unnamed = [v for v in present if v not in names]
    if unnamed:
        raise refuse(422, f"{where}: values {unnamed} have no segment in label_info ({names})")
    unknown = sorted({names[v] for v in present if names[v] not in labels and names[v] not in NOT_LABELS})
    if unknown:
        raise refuse(
            422, f"{where}: segments {unknown} are not labels of this app; name segments as its labels {list(labels)}"
        )
    out = np.zeros(label.shape, np.uint8)
    for v in present:
        if names[v] in labels:
            out[label == v] = labels[names[v]]
    return out


class SafeDatastore(LocalDatastore):
    """MONAI Label's local datastore with checked ids, tags and labels (see module doc). ``labels``: the app's
    {name: value}; ``on_new_image(id, path)``: told of each image added."""

    def __init__(self, *args, labels: dict[str, int], on_new_image=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.app_labels = dict(labels)
        self.on_new_image = on_new_image  # called with (id, path) of each added image

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        if image_id:
            check_name(image_id, "image id")
        try:
            read_image(image_filename)
        except ValueError as err:
            raise refuse(
                415, f"the uploaded image {image_id or ''} is not a readable image or volume ({err})"
            ) from None
        image_id = super().add_image(image_id, image_filename, image_info)
        if self.on_new_image is not None:
            try:
                self.on_new_image(image_id, self.get_image_uri(image_id))
            except Exception as err:  # the image is saved; encoding it ahead is only a speed-up
                logger.warning(f"could not queue {image_id} for encoding: {err}")
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        check_name(label_tag, "label tag")
        if not image_id or image_id not in self.list_images():
            raise refuse(404, f"image {image_id!r} is not a study of this datastore")
        label_info = dict(label_info or {})
        label_path = self.checked_label(image_id, label_filename, label_info)
        try:
            return super().save_label(image_id, str(label_path), label_tag, label_info)
        finally:
            if label_path != Path(label_filename):
                shutil.rmtree(label_path.parent, ignore_errors=True)

    def checked_label(self, image_id: str, path: str, info: dict) -> Path:
        """The upload as the app stores it: readable, the image's geometry, known names, not empty. Values are
        mapped to the app's label values by segment name when ``label_info`` is given (Slicer's Submit sends
        ``[{"name", "idx"}]``); the file is rewritten only where values change. ``info`` gets ``label_names``."""
        where = f"the label of {image_id}"
        try:
            label = read_image(path)
        except ValueError:
            raise refuse(415, f"{where} is not a readable image or volume") from None
        image = read_image(self.get_image_uri(image_id))
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise refuse(
                422, f"{where} is {tuple(label.shape[1:])} but the image is {tuple(image.shape[1:])}: wrong study?"
            )
        if label.dim() == 4 and not np.allclose(label.affine.numpy(), image.affine.numpy(), atol=1e-3):
            raise refuse(422, f"{where} has another position or spacing than the image (affine differs)")
        values = label.as_tensor()[0].round().numpy().astype(np.int64)
        if "label_info" in info:
            key = "idx" if any("idx" in s for s in info["label_info"] or []) else "id"
            names = segment_values(info["label_info"], key)
            stored = to_app_values(values, names, self.app_labels, where)
        else:
            unknown = sorted(int(v) for v in np.unique(values) if v != 0 and v not in self.app_labels.values())
            if unknown:
                raise refuse(422, f"{where} has values {unknown}; this app's labels are {self.app_labels}")
            stored = values.astype(np.uint8)
        if not stored.any():
            raise refuse(422, f"{where} is empty: a study counts as labelled only with at least one object drawn")
        info["label_names"] = {n: v for n, v in self.app_labels.items() if (stored == v).any()}
        if "label_info" in info:
            info["label_info"] = [{"name": n, "idx": v} for n, v in info["label_names"].items()]
        if np.array_equal(stored, values):
            return Path(path)
        ext = "".join(Path(path).suffixes) or ".nii.gz"
        out = Path(tempfile.mkdtemp(prefix="ppgseg_label_"))
        return write_label(torch.from_numpy(stored), label, out, image_id, ext)
