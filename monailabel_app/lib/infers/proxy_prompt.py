"""The two infer tasks: support from other patients' labelled studies (`proxy_prompt`, auto-segmentation) and
support from the slices the user drew in this volume (`proxy_prompt_slices`, the Scribbles panel)."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path

import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.configs.proxy_prompt import ProxyPromptConfig, bad_request
from ppgseg.serving import Study
from ppgseg.workflows import read_image, write_label

logger = logging.getLogger(__name__)


class _ProxyPromptInfer(InferTask):
    def __init__(self, config: ProxyPromptConfig, datastore, type, description: str, options: dict) -> None:
        super().__init__(type=type, labels=dict(config.labels), dimension=3, description=description, config=options)
        self.app, self.datastore = config, datastore

    def is_valid(self) -> bool:
        return True

    def read(self, path: str, what: str):
        try:
            return read_image(path)
        except ValueError as err:
            raise bad_request(415, f"the {what} upload is not a readable image or volume ({err})") from err

    def respond(self, request: dict, image, label: torch.Tensor, labels: dict[str, int], info: dict, start: float):
        image_path = Path(request["image"])
        two_d = image.dim() == 3
        ext = ".png" if two_d and image_path.suffix.lower() in (".png", ".jpg", ".jpeg") else ".nii.gz"
        out_dir = Path(tempfile.gettempdir()) / "ppgseg_results"  # MONAI Label deletes the file once sent
        path = write_label(label, image, out_dir, f"label_{uuid.uuid4().hex}", ext)
        params = {"label_names": labels, **info, "latency_seconds": round(time.monotonic() - start, 2)}
        logger.info(f"{self.description}: {params['weights']}; {params['latency_seconds']} s")
        return str(path), params


class StudySupportInfer(_ProxyPromptInfer):
    """Segments a study from K labelled studies of other patients: by default the K most similar to it (backbone
    features, computed once per study); ``support_ids`` names them instead. Options: ``support_ids``,
    ``num_support`` (K), ``labels`` (names to segment)."""

    def __init__(self, config: ProxyPromptConfig, datastore) -> None:
        options = {"num_support": config.num_support, "support_ids": "", "labels": ",".join(config.labels)}
        super().__init__(
            config, datastore, InferType.SEGMENTATION, "Proxy prompt from other patients' labelled studies", options
        )

    def __call__(self, request: dict):
        start = time.monotonic()
        labels = self.app.pick_labels(request.get("labels"))
        k = request.get("num_support", self.app.num_support)
        try:
            k = int(k)
            assert k >= 1
        except (ValueError, TypeError, AssertionError):
            raise bad_request(422, f"num_support must be a whole number >= 1, got {k!r}") from None
        datastore = self.datastore()
        labelled = self.app.labelled(datastore)
        target_id = request.get("image_id", "")
        if not labelled:
            raise bad_request(
                409,
                "no study of the datastore has a final label yet: label one or more studies and "
                "submit them (Submit Label), or draw slices of this volume and use proxy_prompt_slices",
            )
        image = self.read(request["image"], "image")
        ids = request.get("support_ids") or []
        ids = [i.strip() for i in ids.split(",") if i.strip()] if isinstance(ids, str) else [str(i) for i in ids]
        service = self.app.service()
        if ids:
            paths = [i for i in ids if "/" in i or "\\" in i or ".." in i]
            if paths:
                raise bad_request(400, f"support_ids {paths} look like paths: give study ids of this datastore")
            unknown = [i for i in ids if i not in labelled]
            if unknown:
                raise bad_request(
                    404,
                    f"support_ids {unknown} are not labelled studies of this datastore; labelled: {sorted(labelled)}",
                )
            chosen = [labelled[i] for i in ids]
        else:
            candidates = [s for i, s in labelled.items() if i != target_id]
            if not candidates:
                raise bad_request(409, f"the only labelled study is {target_id} itself: label another study")
            wanted = set(labels.values())
            full = [c for c in candidates if wanted <= service.shows(c)]
            chosen = service.most_similar(Study(target_id, Path(request["image"])), full or candidates, k, image)
        try:
            support = service.study_support(chosen, list(labels.values()))
        except LookupError as err:
            raise bad_request(422, f"{err}; name other support_ids or fewer labels") from err
        label, info = service.segment(image, support)
        info["support_ids"] = [s.id for s in chosen]
        return self.respond(request, image, label, labels, info, start)


class SliceSupportInfer(_ProxyPromptInfer):
    """Segments a volume from the slices the user labelled in it (the ``label`` upload of Slicer's Scribbles panel,
    values = the app's label values, 0 elsewhere). Every other slice is segmented; the user's slices come back as
    drawn. Option: ``labels`` (names to segment; default: those drawn)."""

    def __init__(self, config: ProxyPromptConfig, datastore) -> None:
        super().__init__(
            config, datastore, InferType.SCRIBBLES, "Proxy prompt from the slices drawn in this volume", {"labels": ""}
        )

    def __call__(self, request: dict):
        start = time.monotonic()
        if not request.get("label"):
            raise bad_request(400, "proxy_prompt_slices needs the label upload: the slices you drew in this volume")
        image = self.read(request["image"], "image")
        upload = self.read(request["label"], "label")
        if image.dim() != 4:
            raise bad_request(422, "proxy_prompt_slices segments volumes; for a 2D image use proxy_prompt")
        label = upload.as_tensor()[0].round().long()
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise bad_request(
                422,
                f"the uploaded label is {tuple(label.shape)} but the image is "
                f"{tuple(image.shape[1:])}: upload the label of this volume",
            )
        values = sorted(int(v) for v in label.unique().tolist() if v != 0)
        if not values:
            raise bad_request(422, "the uploaded label is empty: draw at least one slice")
        unknown = [v for v in values if v not in self.app.labels.values()]
        if unknown:
            raise bad_request(
                422, f"the uploaded label has values {unknown} that are not labels of this app ({self.app.labels})"
            )
        names = {v: n for n, v in self.app.labels.items()}
        labels = self.app.pick_labels(request.get("labels") or [names[v] for v in values])
        missing = [n for n, v in labels.items() if v not in values]
        if missing:
            raise bad_request(422, f"labels {missing} are not drawn on any slice of the upload")
        service = self.app.service()
        axis = service.axis
        drawn = [z for z in range(label.shape[axis]) if bool(label.select(axis, z).any())]
        name = request.get("image_id") or Path(request["image"]).name
        support = service.slice_support(image, label, list(labels.values()), name)
        out, info = service.segment(image, support, skip=drawn)
        for z in drawn:  # the user's slices as drawn
            out.select(axis, z).copy_(label.select(axis, z).to(out.dtype))
        info["drawn_slices"] = drawn
        return self.respond(request, image, out, labels, info, start)
