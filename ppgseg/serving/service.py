"""Few-shot segmentation as a service (what the MONAI Label app runs): support sets chosen among labelled studies by
backbone-feature similarity, weights fine-tuned on the fly on a support set the model has not been trained on, and
support encodings cached per support set, so that the next request on the same support set only segments.

One model serves every request; the weights that fit a support set are loaded into it under a lock, so requests are
served one at a time and a result never depends on what ran before it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..data.intensity import to_byte_range
from ..inference.atlas import AtlasRegistration, Registered
from ..inference.policy import DecodePolicy
from ..inference.slices import as_slices
from ..inference.volume import (
    Atlas,
    EncodedVolume,
    encoded_slices,
    propagate,
    register_atlases,
    segment_atlases,
    to_volume,
)
from ..io import read_image, read_label
from ..modeling.generator import SupportEmbedding
from ..modeling.proxy_sam import ProxyPromptSAM
from ..training.registered import RegisteredEpisodes, RegistrationFineTune, cross_register
from .encodings import EncodingCache, StudyEncoder
from .segmenters import ImageSegmenter
from .similarity import StudySimilarity
from .studies import Study, Support, SupportReader, digest, keep, sample_slices
from .weights import ON_THE_FLY, FineTuneSettings, SupportWeights

logger = logging.getLogger("ppgseg")
REGISTERED_KEPT = 10  # registrations kept (a displacement field each: ~55 MB for 256 x 256 x 35 voxels)

# the service's decoding unless told otherwise: an object the support carries nowhere on a slice is left empty there,
# undecoded (generated 100-slice CT study, three objects: Auto Segmentation 40 -> 36 s, kidney Dice 0.80 -> 0.82)
SERVICE_POLICY = DecodePolicy(min_carried=0.05)


class ProxyPromptService:
    """Segments studies from support sets with one ProxyPromptSAM.

    Args:
        model: the model, with its base weights loaded (bundle default or trained).
        weights: a short description of the base weights, given back with every result.
        cache_dir: where study vectors, study encodings and fine-tuned weights are kept across restarts.
        segmenter: how a study is segmented (`ImageSegmenter` with its decoding policy by default; `VideoSegmenter`
            for SAM 2 in video mode).
        axis: slicing axis of volumes.
        support_slices: slices taken from each labelled support volume (evenly spaced among those with an object).
        finetune: the on-the-fly fine-tune (`FineTuneSettings`).
        trained_on: stamps of the studies the base weights were trained on (used without fine-tuning).
        memory: support sets, fine-tuned weights and support encodings kept in memory.
        encode_cache_bytes: disk space for encoder features of whole studies (``cache_dir/features``); 0 turns it
            off. Only where the image encoder is frozen and the segmenter reads features.
    """

    def __init__(
        self,
        model: ProxyPromptSAM,
        *,
        weights: str,
        cache_dir: str | Path,
        segmenter: ImageSegmenter | None = None,
        axis: int = 2,
        support_slices: int = 3,
        finetune: FineTuneSettings = ON_THE_FLY,
        trained_on: Sequence[str] = (),
        memory: int = 8,
        encode_cache_bytes: int = 4 * 2**30,
    ) -> None:
        self.model, self.axis, self.memory = model.eval(), axis, memory
        self.segmenter = segmenter or ImageSegmenter(SERVICE_POLICY)
        self.lock = threading.RLock()
        self.supports = SupportReader(axis=axis, support_slices=support_slices, memory=memory)
        self.weights = SupportWeights(
            model, weights, Path(cache_dir), settings=finetune, trained_on=trained_on, memory=memory
        )
        self.similarity = StudySimilarity(model, cache_dir, axis)
        self.encoder = None
        if encode_cache_bytes > 0 and self.segmenter.reads_features and not model.encoder_trains:
            self.encoder = StudyEncoder(
                model, EncodingCache(Path(cache_dir) / "features", encode_cache_bytes), self.lock, axis
            )
        if getattr(self.segmenter, "policy", None) and self.segmenter.policy.sparse and self.encoder is None:
            logger.warning(
                f"z_stride {self.segmenter.policy.z_stride}: sparse decoding reads the study encoding cache, which is "
                "off here (encode_cache_bytes 0, tiles, video mode or a trainable encoder): every slice is decoded"
            )
        self._embeddings: OrderedDict[str, SupportEmbedding] = OrderedDict()  # weights key + support key
        self.registration = AtlasRegistration()
        self._registered: OrderedDict[str, Registered] = OrderedDict()  # target stamp + atlas stamp + labels
        self._registered_lock = threading.Lock()

    def set_weights(self, description: str, trained_on: Sequence[str] = ()) -> None:
        """Take the model's current weights as the base (after loading new trained weights into it)."""
        with self.lock:
            self.weights.set_base(description, trained_on)
            self._embeddings.clear()

    def prepare(self, support: Support) -> tuple[SupportEmbedding, dict]:
        """Weights and support encoding for ``support`` (cached), loaded and ready to segment. Call under
        ``self.lock`` together with the segmentation that uses them."""
        start = time.monotonic()
        pairs = self.segmenter.pairs(support.samples)
        key, description, bank = self.weights.load(support, pairs, trains=self.segmenter.fine_tunes)
        full = f"{key}/{support.key}"
        cached = full in self._embeddings
        if cached:
            self._embeddings.move_to_end(full)
        else:
            keep(self._embeddings, full, self.segmenter.encode_support(self.model, support, bank), self.memory)
        info = {
            "weights": description,
            "support_cached": cached,
            "support_pairs": len(support.samples),
            "support": support.sources,
            "prepare_seconds": round(time.monotonic() - start, 2),
        }
        return self._embeddings[full], info

    def segment(
        self, image: Tensor, support: Support, *, skip: Sequence[int] = (), study: Study | None = None
    ) -> tuple[Tensor, dict]:
        """Label map of a 2D image or volume (C, *spatial) from ``support``; slices in ``skip`` are left 0. ``study``:
        the datastore study ``image`` was read from, whose encoder features are then cached (`StudyEncoder`)."""
        start = time.monotonic()
        features = None
        if study is not None and image.dim() == 4 and self.encoder is not None:
            cached = study in self.encoder
            features = self.encoder.features(study, image)
        with self.lock:
            embedding, info = self.prepare(support)
            if features is not None:
                info["study_encoding"] = "cached" if cached else f"encoded now ({time.monotonic() - start:.1f} s)"
            start = time.monotonic()
            label, more = self.segmenter.segment(
                self.model, image, embedding, support.label_ids, axis=self.axis, skip=skip, features=features
            )
            info |= more
            info["segment_seconds"] = round(time.monotonic() - start, 2)
        return label, info

    def encoded(self, image: Tensor, study: Study | None = None, axis: int | None = None) -> tuple[EncodedVolume, str]:
        """A volume's slices along ``axis`` (default the service's) encoded (`encoded_slices`): from the study
        encoding cache where ``study`` is given, the cache is on and the axis is the service's, else now. Also says
        which."""
        start = time.monotonic()
        axis = self.axis if axis is None else axis
        if study is not None and self.encoder is not None and axis == self.axis:
            cached = study in self.encoder
            features = self.encoder.features(study, image)
            with self.lock:
                volume = encoded_slices(self.model, image, axis, features)
            return volume, "cached" if cached else f"encoded now ({time.monotonic() - start:.1f} s)"
        with self.lock:
            volume = encoded_slices(self.model, image, axis)
        return volume, f"encoded now ({time.monotonic() - start:.1f} s)"

    def segment_registered(
        self,
        image: Tensor,
        studies: Sequence[Study],
        label_ids: Sequence[int],
        *,
        study: Study | None = None,
        axis: int | None = None,
        tune_on: Sequence[Study] | None = None,
    ) -> tuple[Tensor, dict]:
        """Label map of a volume (C, *spatial) from labelled ``studies`` registered onto it (`AtlasRegistration`):
        each slice prompted by the studies' slices at its position, the atlases' vote as the registration prompt
        (`inference.volume.segment_registered`), with the base weights fine-tuned for the route on the labelled
        studies ``tune_on`` (default ``studies``; `atlas_weights`). ``study``: as in `segment`; ``axis``: the slicing
        axis (default the service's)."""
        axis = self.axis if axis is None else axis
        volume, how = self.encoded(image, study, axis)
        info: dict = {"study_encoding": how}
        atlases = [self.atlas(s, axis) for s in studies]
        start = time.monotonic()
        registered, info["registrations_cached"] = self.registered(image, study, studies, atlases, label_ids)
        info["registration_seconds"] = round(time.monotonic() - start, 2)
        with self.lock:
            start = time.monotonic()
            info["weights"] = self.atlas_weights(studies if tune_on is None else tune_on, label_ids, axis)
            info["weights_seconds"] = round(time.monotonic() - start, 2)
            start = time.monotonic()
            label = segment_atlases(self.model, image, volume, atlases, registered, label_ids, axis)
        info["segment_seconds"] = round(time.monotonic() - start, 2)
        return to_volume(label, axis), info

    def atlas(self, study: Study, axis: int) -> Atlas:
        """A labelled study read and encoded (from the study encoding cache where it is on) for the registration
        route."""
        image = read_image(study.image)
        return Atlas(image, read_label(study.label), self.encoded(image, study, axis)[0])

    def atlas_weights(self, studies: Sequence[Study], label_ids: Sequence[int], axis: int) -> str:
        """Load the registration route's weights for the labelled ``studies`` (`SupportWeights.load_atlases`): the
        base weights fine-tuned on them registered onto each other (`RegistrationFineTune`), trained on first use and
        kept until a study's files change. Call under ``self.lock``."""
        ordered = sorted(studies, key=lambda s: s.stamp())  # one set, one key, whatever order they came in
        s = self.weights.settings
        if not RegistrationFineTune.applies(self.model):
            self.weights.load_base()
            return self.weights.description

        def train():
            atlases = [self.atlas(st, axis) for st in ordered]
            registered = cross_register(self.registration, atlases, label_ids)
            data = RegisteredEpisodes(self.model, atlases, registered, label_ids, axis)
            return RegistrationFineTune(episodes=s.atlas_episodes, lr=s.atlas_lr, seed=s.seed)(self.model, data)

        return self.weights.load_atlases([st.stamp() for st in ordered], label_ids, axis, train)

    def registered(
        self,
        image: Tensor,
        target: Study | None,
        studies: Sequence[Study],
        atlases: Sequence[Atlas],
        label_ids: Sequence[int],
    ) -> tuple[list[Registered], int]:
        """``atlases`` (of the labelled ``studies``) registered onto ``image``, and how many were kept from an earlier
        request: registrations are kept for the last `REGISTERED_KEPT` pairs of a datastore ``target`` and labelled
        study, until either file changes; the others are registered now, in one pass."""
        keys = [
            None if target is None else digest("registered/1", target.stamp(), s.stamp(), list(label_ids))
            for s in studies
        ]
        found: dict[int, Registered] = {}
        with self._registered_lock:
            for k, key in enumerate(keys):
                if key in self._registered:
                    self._registered.move_to_end(key)
                    found[k] = self._registered[key]
        missing = [k for k in range(len(atlases)) if k not in found]
        done = register_atlases(self.registration, image, [atlases[k] for k in missing], label_ids)
        with self._registered_lock:
            for k, r in zip(missing, done, strict=True):
                found[k] = r
                if keys[k] is not None:
                    keep(self._registered, keys[k], r, REGISTERED_KEPT)
        return [found[k] for k in range(len(atlases))], len(atlases) - len(missing)

    def propagate(
        self,
        image: Tensor,
        drawn: dict[int, Tensor],
        label_ids: Sequence[int],
        *,
        study: Study | None = None,
        axis: int | None = None,
    ) -> tuple[Tensor, dict]:
        """Label map of a volume (C, *spatial) from slices drawn in it, propagated outward slice by slice
        (`inference.volume.propagate`, each neighbour's masks carried by 2D registration), with the base weights.
        ``drawn``: slice index along the service's axis -> (H, W) label map of ``label_ids``; an all-zero one says the
        objects are not on that slice. ``study``: as in `segment` (its encoder features cached); ``axis``: the slicing
        axis ``drawn`` counts along (default the service's)."""
        axis = self.axis if axis is None else axis
        volume, how = self.encoded(image, study, axis)
        info = {"study_encoding": how}
        with self.lock:
            self.weights.load_base()
            start = time.monotonic()
            slices = as_slices(image, axis).float().mean(1)  # what each next slice's masks are registered onto
            label = to_volume(propagate(self.model, volume, drawn, label_ids, slices=slices), axis)
        info |= {"weights": self.weights.description, "segment_seconds": round(time.monotonic() - start, 2)}
        return label, info

    def confidence(self, image: Tensor, support: Support, slices: int = 3) -> float:
        """The mask decoder's mean predicted IoU over the objects on a few slices of ``image``: low means unsure."""
        with self.lock:
            embedding, _ = self.prepare(support)
            stack = as_slices(image, self.axis)
            picked = torch.stack([to_byte_range(stack[z]) for z in sample_slices(len(stack), slices)])
            with torch.no_grad():
                _, iou = self.model.segment(picked, embedding, with_iou=True)
        return float(iou.mean())

    # what the app asks of the parts
    def study_support(self, studies: Sequence[Study], label_ids: Sequence[int]) -> Support:
        return self.supports.studies(studies, label_ids)

    def most_similar(self, target: Study, candidates: Sequence[Study], k: int, image: Tensor | None = None):
        with self.lock:
            return self.similarity.most_similar(target, candidates, k, image)

    def vector(self, study: Study) -> Tensor:
        with self.lock:
            return self.similarity.vector(study)

    def shows(self, study: Study) -> set[int]:
        return self.similarity.shows(study)

    def prefetch(self, study: Study) -> None:
        if self.encoder is not None:
            self.encoder.prefetch(study)
