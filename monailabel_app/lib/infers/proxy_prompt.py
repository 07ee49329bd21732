"""The two infer tasks: support from other patients' labelled studies (`proxy_prompt`, auto-segmentation) and
support from the slices the user drew in this volume (`proxy_prompt_slices`, the Scribbles panel)."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.configs.proxy_prompt import ProxyPromptConfig, bad_request
from lib.datastore import PANEL_LAYERS, segment_values
from lib.drawn import keep_accepted
from ppgseg.io import read_image, write_label
from ppgseg.serving import Study

logger = logging.getLogger(__name__)
ATLAS_TUNE_STUDIES = 10  # labelled studies the registration route's fine-tune learns from, at most


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
        """Write the answer: ``label`` holds the app's values for ``labels``; the file holds 1..N in the order of
        ``labels`` and ``label_names`` says so (3D Slicer loads value i into the i-th name). What each label got is
        kept as the last result for this image."""
        masks = {n: (label == v).numpy() for n, v in labels.items()}
        self.app.results.put(self.app.result_key(request), masks)
        label = torch.zeros_like(label, dtype=torch.uint8)
        for i, mask in enumerate(masks.values()):
            label[torch.from_numpy(mask)] = i + 1
        labels = {n: i + 1 for i, n in enumerate(masks)}
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
        target = Study(target_id, Path(request["image"])) if target_id else None
        if image.dim() == 4 and self.app.auto_route == "registration":
            missing = [n for n, v in labels.items() if not any(v in service.shows(s) for s in chosen)]
            if missing:
                raise bad_request(422, f"{missing} appear in no chosen labelled study; name other support_ids")
            axis = self.app.slice_axis(image)
            # the route's fine-tune learns from every other labelled study that shows all the labels (the first
            # ATLAS_TUNE_STUDIES by id), whichever are chosen as atlases: one set, trained once, for every target
            wanted = set(labels.values())
            tune_on = [s for i, s in sorted(labelled.items()) if i != target_id and wanted <= service.shows(s)]
            tune_on = tune_on[:ATLAS_TUNE_STUDIES]
            label, info = service.segment_registered(
                image, chosen, list(labels.values()), study=target, axis=axis, tune_on=tune_on or chosen
            )
            info["slice_axis"] = axis
            info["route"] = "registration prompt, supports at each slice's position"
        else:
            try:
                support = service.study_support(chosen, list(labels.values()))
            except LookupError as err:
                raise bad_request(422, f"{err}; name other support_ids or fewer labels") from err
            label, info = service.segment(image, support, study=target)
            info["route"] = "fixed supports"
        info["support_ids"] = [s.id for s in chosen]
        return self.respond(request, image, label, labels, info, start)


class SliceSupportInfer(_ProxyPromptInfer):
    """Segments a volume from the slices the user drew or corrected in it (Slicer's Scribbles panel: Update), by
    propagation: outward from the drawn slices, each next slice prompted by its nearest drawn or already segmented
    slices, an object ending where it comes back empty or unsure (`ProxyPromptService.propagate`).

    The ``label`` upload is Slicer's export of every segment, value = segment position + 1, named by ``label_info``
    (``[{"name", "id"}]``); the answer is ``selected_label_name`` as value 1, what the panel loads. The panel's
    ``foreground_scribbles`` layer adds to the selected object and ``background_scribbles`` marks not-object. The
    slices drawn in this Update are those that differ from what the app last returned for this image and object, plus
    the slices with scribbles: correcting two slices of an automatic result propagates the correction outward until it
    meets that result, which stays where the user left it (`keep_accepted`); with no
    earlier result, every slice that shows the object. Every slice drawn in an earlier Update of the same study and
    object stays a support (kept in the datastore, so also across a restart) until it is drawn again. A slice where the
    user erased the object says "not here": a support with an empty mask, and propagation does not pass it. Clearing
    the segment (the object erased from most slices of the last result) starts afresh from what is drawn now. The
    drawn slices come back as drawn. Without ``label_info`` (other clients), values are the app's label values, the
    ``labels`` option (default: those drawn) names what to segment, and the answer has values 1..N in that order."""

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
        values = upload.as_tensor()[0].round().long().numpy()
        if tuple(values.shape) != tuple(image.shape[1:]):
            raise bad_request(
                422,
                f"the uploaded label is {tuple(values.shape)} but the image is "
                f"{tuple(image.shape[1:])}: upload the label of this volume",
            )
        axis, shape = self.app.slice_axis(image), values.shape
        wanted, erase, marked = self.drawn_objects(request, values, axis)
        service, key = self.app.service(), self.app.result_key(request)
        target = Study(request["image_id"], Path(request["image"])) if request.get("image_id") else None
        out = np.zeros(shape, np.uint8)
        info: dict = {}
        for name, mask in wanted.items():
            kept, edited, accepted = self.drawn_slices(request, key, name, mask, marked, axis)
            if not edited:
                raise bad_request(
                    422,
                    f"nothing drawn or changed for {name} since the last result: draw {name} on one or more slices, "
                    "or correct the result on a slice, then Update",
                )
            shows = sorted(z for z, m in kept.items() if m.any())
            if not shows:
                raise bad_request(422, f"{name} is drawn on no slice (the slices you drew show none of it): draw it")
            self.app.drawn.put(key, name, shape, axis, kept)
            value = self.app.labels[name]
            drawn = {z: torch.from_numpy(m.astype(np.uint8) * value) for z, m in kept.items()}
            label, more = service.propagate(image, drawn, [value], study=target, axis=axis)
            got = label.numpy() == value
            for z, m in kept.items():  # the user's slices as drawn
                np.moveaxis(got, axis, 0)[z] = m
            if accepted is not None:  # a correction: the earlier result stays where the correction does not reach
                slices = keep_accepted(np.moveaxis(got, axis, 0), np.moveaxis(accepted, axis, 0), edited, set(kept))
                got = np.moveaxis(slices, 0, axis)
            out[got & (out == 0)] = value
            info |= more
            info.setdefault("drawn_slices", []).extend(edited)
            info.setdefault("support_slices", []).extend(shows)
            info.setdefault("not_here_slices", []).extend(sorted(set(kept) - set(shows)))
        out[erase] = 0
        info = {k: sorted(set(v)) if isinstance(v, list) else v for k, v in info.items()}
        info["slice_axis"] = axis
        info["support_pairs"] = len(info["support_slices"])
        return self.respond(request, image, torch.from_numpy(out), {n: self.app.labels[n] for n in wanted}, info, start)

    def drawn_slices(
        self, request: dict, key: str, name: str, mask: np.ndarray, marked: list[int], axis: int
    ) -> tuple[dict[int, np.ndarray], list[int], np.ndarray | None]:
        """Every slice drawn so far for ``name`` ({slice: (H, W) mask}, this Update's drawing replacing earlier ones
        on the same slice), the slices drawn in this Update, and the earlier result this Update corrects (None: a
        first drawing, another client's upload, or a cleared segment drawn afresh)."""
        by_slice = np.moveaxis(mask, axis, 0)
        kept = self.app.drawn.get(key, name, mask.shape, axis)
        # a Slicer upload holds the whole segmentation, so slices are compared with the last result; other clients
        # upload only what they drew
        last = self.app.results.get(key, name, mask.shape) if "label_info" in request else None
        accepted = last
        if last is None:
            edited = by_slice.reshape(len(by_slice), -1).any(1)
        else:
            last_by_slice = np.moveaxis(last, axis, 0)
            edited = (by_slice != last_by_slice).reshape(len(by_slice), -1).any(1)
            shown = last_by_slice.reshape(len(by_slice), -1).any(1)
            result_only = [z for z in np.flatnonzero(shown) if z not in kept]  # what propagation added
            erased = [z for z in result_only if not by_slice[z].any()]
            if result_only and len(erased) > len(result_only) / 2:  # the segment was cleared: start afresh
                kept, accepted = {}, None
                edited = by_slice.reshape(len(by_slice), -1).any(1)
        edited[marked] = True
        drawn = np.flatnonzero(edited).tolist()
        kept.update({z: by_slice[z].copy() for z in drawn})
        return kept, drawn, accepted

    def drawn_objects(
        self, request: dict, values: np.ndarray, axis: int
    ) -> tuple[dict[str, np.ndarray], np.ndarray, list[int]]:
        """{label name: drawn mask}, the not-object mask (background scribbles) and the slices with scribbles."""
        present = sorted(int(v) for v in np.unique(values) if v != 0)
        if not present:
            raise bad_request(422, "the uploaded label is empty: draw at least one slice")
        if "label_info" not in request:
            unknown = [v for v in present if v not in self.app.labels.values()]
            if unknown:
                raise bad_request(
                    422, f"the uploaded label has values {unknown} that are not labels of this app ({self.app.labels})"
                )
            by_value = {v: n for n, v in self.app.labels.items()}
            labels = self.app.pick_labels(request.get("labels") or [by_value[v] for v in present])
            missing = [n for n, v in labels.items() if v not in present]
            if missing:
                raise bad_request(422, f"labels {missing} are not drawn on any slice of the upload")
            return {n: values == v for n, v in labels.items()}, np.zeros(values.shape, bool), []
        selected = request.get("selected_label_name")
        if not selected:
            raise bad_request(400, "label_info came without selected_label_name: say which segment to update")
        if selected not in self.app.labels:
            raise bad_request(
                422,
                f"the selected segment {selected!r} is not a label of this app; its labels are {list(self.app.labels)}",
            )
        names = segment_values(request["label_info"], "id")
        unnamed = [v for v in present if v not in names]
        if unnamed:
            raise bad_request(422, f"the uploaded label has values {unnamed} that label_info does not name ({names})")
        masks: dict[str, np.ndarray] = {}
        for v in present:
            masks[names[v]] = masks.get(names[v], False) | (values == v)
        none = np.zeros(values.shape, bool)
        scribbles = masks.get(PANEL_LAYERS[0], none) | masks.get(PANEL_LAYERS[1], none)
        erase = masks.get(PANEL_LAYERS[1], none)
        obj = (masks.get(selected, none) | masks.get(PANEL_LAYERS[0], none)) & ~erase
        marked = [z for z in range(values.shape[axis]) if scribbles.take(z, axis).any()]
        return {selected: obj}, erase, marked
