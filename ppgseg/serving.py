"""Few-shot segmentation as a service (what the MONAI Label app runs): support sets chosen among labelled studies by
backbone-feature similarity, weights fine-tuned on the fly on a support set the model has not been trained on, and
support encodings cached per support set, so that the next request on the same support set only segments.

One model serves every request; the weights that fit a support set are loaded into it under a lock, so requests are
served one at a time and a result never depends on what ran before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor

from .backbones.base import Features
from .checkpoint import load_ppg, save_ppg, trainable_state
from .data.contract import Sample, load_samples
from .data.episodes import to_byte_range
from .modeling.generator import SupportEmbedding
from .modeling.proxy_sam import ProxyPromptSAM
from .modeling.proxy_sam2_video import ProxyPromptVideo, VideoSupport
from .tiling import NativeTileInferer, tile_samples
from .training import EpisodeBank, EpisodeNet, make_optimizer, train_episodes
from .video_workflows import label_clip, video_support
from .workflows import as_slices, encode_samples, encode_slices, read_image, segment_image

logger = logging.getLogger("ppgseg")


@dataclass(frozen=True)
class Study:
    """A study of the datastore: its id, image file and (final) label file, if labelled."""

    id: str
    image: Path
    label: Path | None = None

    def stamp(self) -> str:
        """Changes whenever the image or the label file changes (path, size, modification time)."""
        parts = [self.image] + ([self.label] if self.label else [])
        return "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in parts)


@dataclass
class Support:
    """A support set: labelled 2D samples for ``label_ids``, and whether its pairs come from one study (then episodes
    take supports from the target's own study). ``key`` names its content."""

    samples: list[Sample]
    label_ids: list[int]
    key: str
    same_study: bool = False
    sources: list[str] = field(default_factory=list)
    stamps: list[str] = field(default_factory=list)  # of the labelled studies it comes from
    drawn: bool = False  # slices the user drew in the study being segmented


def digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_slices(n: int, count: int = 3) -> list[int]:
    """``count`` evenly spaced indices inside ``range(n)`` (25 %, 50 %, 75 % for 3)."""
    return sorted({min(n - 1, int(n * (i + 1) / (count + 1))) for i in range(count)})


class EncodingCache:
    """Encoder features of whole studies, one file per study version in ``folder``, at most ``max_bytes`` in all
    (the least recently used go first). Files are written whole (a temporary file, then renamed)."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def get(self, key: str) -> Features | None:
        path = self.path(key)
        with self._lock:
            try:
                data = torch.load(path, weights_only=True)
                os.utime(path)  # recently used
            except (OSError, RuntimeError, EOFError):  # absent, evicted meanwhile, or unreadable: encode again
                return None
        return Features(data["embed"], tuple(data["high_res"]))

    def put(self, key: str, features: Features) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(".tmp")
        torch.save({"embed": features.embed, "high_res": list(features.high_res)}, tmp)
        with self._lock:
            tmp.replace(self.path(key))
            files = sorted(self.folder.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
            total = sum(p.stat().st_size for p in files)
            for old in files:
                if total <= self.max_bytes or old == self.path(key):
                    break
                total -= old.stat().st_size
                old.unlink()

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()


# `ProxyPromptService`'s on-the-fly fine-tune checks the support-episode loss at these shares of its time and serves
# the best weights checked: how many episodes fit in the bound varies with the machine, and later is not always
# better (generated studies, 9 support pairs: check loss 0.403 after 48 episodes, 0.506 after 56; liver Dice 0.700
# -> 0.555)
FINETUNE_CHECKS = (0.5, 0.75, 1.0)


class ProxyPromptService:
    """Segments studies from support sets with one ProxyPromptSAM.

    Args:
        model: the model, with its base weights loaded (bundle default or trained).
        weights: a short description of the base weights, given back with every result.
        cache_dir: where study feature vectors and on-the-fly fine-tuned weights are kept across restarts.
        axis: slicing axis of volumes.
        support_slices: slices taken from each labelled support volume (evenly spaced among those with an object).
        finetune_seconds: time bound of an on-the-fly fine-tune on other studies' labels (0: never fine-tune).
        finetune_drawn_seconds: the same for slices drawn in the study being segmented (0, the default: the user
            waits for that answer, and a fine-tune on a handful of slices has lowered Dice on generated studies).
        finetune_lr: its learning rate (the paper's SGD otherwise; at the paper's 0.01 a minute on nine CT slices
            collapsed the bundle's default weights to empty masks). A fine-tune that does not lower the loss of
            fixed episodes of the support is discarded.
        trained_on: stamps of the studies the base weights were trained on; a support set made only of those is
            used without fine-tuning.
        tile: segment images larger than the encoder input in overlapping native-resolution tiles of this side
            (`tiling.NativeTileInferer`; support pairs and fine-tune episodes cut into the same tiles); None: one
            down-scaled pass per image or slice.
        encode_cache_bytes: disk space for encoder features of whole studies (`study_features`, kept in
            ``cache_dir/features``); 0 turns it off. Only where the image encoder is frozen (its features do not
            depend on what trains) and not in video mode.
        min_carried: an object that the support carries to no part of a slice (its carried mask below this
            everywhere) is answered empty there without running the mask decoder (`ProxyPromptSAM.segment_features`).
            On a generated 100-slice CT study with three objects, 0.05 cut Auto Segmentation from 40 to 36 s and
            raised kidney Dice 0.80 -> 0.82 (liver unchanged); 0 decodes every object on every slice.
        box_refine: each mask refined by a second decoder pass prompted with its own box
            (`ProxyPromptSAM.refine_with_box`): one more decode per object and slice.
        z_stride: > 1 decodes a cached study's slices sparsely (`workflows.sparse_slice_logits`): every
            ``z_stride``-th slice, then only where two decoded slices disagree; agreeing gaps are interpolated. 1
            decodes every slice, as does a service without the study encoding cache.
    """

    def __init__(
        self,
        model: ProxyPromptSAM,
        *,
        weights: str,
        cache_dir: str | Path,
        axis: int = 2,
        support_slices: int = 3,
        finetune_seconds: float = 60.0,
        finetune_drawn_seconds: float = 0.0,
        finetune_lr: float = 0.002,
        trained_on: Sequence[str] = (),
        seed: int = 0,
        memory: int = 8,
        tile: int | None = None,
        encode_cache_bytes: int = 4 * 2**30,
        min_carried: float = 0.05,
        box_refine: bool = False,
        z_stride: int = 1,
    ) -> None:
        if not 0 <= axis <= 2:
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        if support_slices < 1:
            raise ValueError(f"support_slices must be >= 1, got {support_slices}")
        if not 0 <= min_carried < 1:
            raise ValueError(f"min_carried must be in [0, 1), got {min_carried}")
        if z_stride < 1:
            raise ValueError(f"z_stride must be >= 1, got {z_stride}")
        if finetune_seconds < 0 or finetune_drawn_seconds < 0:
            raise ValueError(f"finetune seconds must be >= 0, got {finetune_seconds}, {finetune_drawn_seconds}")
        self.model = model.eval()
        self.cache_dir = Path(cache_dir)
        self.axis, self.support_slices, self.finetune_seconds = axis, support_slices, float(finetune_seconds)
        self.finetune_drawn_seconds = float(finetune_drawn_seconds)
        self.seed, self.memory, self.finetune_lr = seed, memory, finetune_lr
        self.min_carried, self.box_refine, self.z_stride = float(min_carried), bool(box_refine), int(z_stride)
        self.lock = threading.RLock()
        self._vectors: dict[str, Tensor] = self._load_vectors()
        self._shows: dict[str, set[int]] = {}
        self._states: OrderedDict[str, tuple[dict, str]] = OrderedDict()  # weights key -> (state, description)
        self._embeddings: OrderedDict[str, SupportEmbedding] = OrderedDict()  # weights key + support key
        self._supports: OrderedDict[str, Support] = OrderedDict()  # support key -> the slices read for it
        self._supports_lock = threading.Lock()  # not the model's lock: reading a cached support waits for no segment
        self.inferer = NativeTileInferer(tile) if tile else None
        if tile and self.video:
            raise ValueError("tile: SAM 2's video mode propagates whole slices; leave tile unset")
        self.features = None
        if encode_cache_bytes > 0 and not self.video and not model.encoder_trains and not tile:
            self.features = EncodingCache(self.cache_dir / "features", encode_cache_bytes)
        if z_stride > 1 and self.features is None:
            logger.warning(
                f"z_stride {z_stride}: sparse decoding reads the study encoding cache, which is off here "
                "(encode_cache_bytes 0, tile, video mode or a trainable encoder): every slice is decoded"
            )
        self._encoding: dict[str, threading.Lock] = {}  # study key -> held while that study is being encoded
        self._queue: queue.Queue[Study] = queue.Queue()
        self._worker: threading.Thread | None = None
        self.set_weights(weights, trained_on)

    @property
    def video(self) -> bool:
        """SAM 2 in video mode: volumes are segmented by propagation through SAM 2's memory."""
        return isinstance(self.model, ProxyPromptVideo)

    # --- weights -------------------------------------------------------------------------------------------------
    def set_weights(self, description: str, trained_on: Sequence[str] = ()) -> None:
        """Take the model's current weights as the base (after loading new trained weights into it)."""
        with self.lock:
            self.base = self._snapshot()
            self.base_description, self.trained_on = description, set(trained_on)
            self.base_key = digest(description, sorted(self.trained_on))
            self._states.clear()
            self._embeddings.clear()

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=False)

    def _weights_for(self, support: Support) -> tuple[str, str, EpisodeBank | None]:
        """Load the weights for ``support`` into the model: the base weights where they were trained on every
        support study or fine-tuning is off, else the base fine-tuned on the support pairs (cached in memory and on
        disk). Returns the weights key, their description and the fine-tune's bank (None when nothing was trained)."""
        known = bool(support.stamps) and set(support.stamps) <= self.trained_on
        bound = self.finetune_drawn_seconds if support.drawn else self.finetune_seconds
        if bound == 0 or known or self.video:  # the fine-tune trains image episodes only
            self._load(self.base)
            return self.base_key, self.base_description, None
        key = digest(self.base_key, support.key, bound, self.finetune_lr, self.seed)
        if key in self._states:
            state, description = self._states[key]
            self._states.move_to_end(key)
            self._load(state)
            return key, description, None
        path = self.cache_dir / "finetuned" / f"{key}.pt"
        if path.is_file():
            self._load(self.base)
            load_ppg(self.model, path)
            description = json.loads(path.with_suffix(".json").read_text())["weights"]
            self._remember(key, description)
            return key, description, None
        self._load(self.base)
        start = time.monotonic()
        torch.manual_seed(self.seed)
        bank = EpisodeBank(
            self.model, self.pairs(support), support.label_ids, views=2, seed=self.seed, same_study=support.same_study
        )
        k = max(1, min(4, len(support.samples) - 1))
        checks = [bank.draw(np.random.default_rng([self.seed, i]), k) for i in range(8)]
        check_start = time.monotonic()
        before = self._check_loss(bank, checks)
        trained = time.monotonic()
        deadline = start + bound - len(FINETUNE_CHECKS) * (trained - check_start)  # the checks fit in the bound
        optimizer = make_optimizer(self.model, lr=self.finetune_lr)
        losses: list[float] = []
        after, kept, best = before, 0, None
        for i, share in enumerate(FINETUNE_CHECKS):
            until = trained + share * (deadline - trained)
            losses += train_episodes(
                self.model, bank, steps=10_000, num_support=k, seed=self.seed + i, until=until, optimizer=optimizer
            )
            last = self._check_loss(bank, checks)
            if last < after:
                after, kept, best = last, len(losses), self._snapshot()
        seconds = time.monotonic() - start
        what = f"{len(support.samples)} support pairs ({len(losses)} episodes, {seconds:.0f} s, support-episode loss "
        if best is not None:
            self._load(best)
            at = "" if kept == len(losses) else f"; weights after episode {kept}, {last:.3f} at the end"
            description = f"{self.base_description} + fine-tuned on the fly on {what}{before:.3f} -> {after:.3f}{at})"
        else:  # never serve weights that do worse on the support's own episodes than the base did
            self._load(self.base)
            description = (
                f"{self.base_description} (kept: a fine-tune on {what}{before:.3f} -> {last:.3f}) did not help)"
            )
        logger.info(description)
        save_ppg(self.model, path)
        path.with_suffix(".json").write_text(json.dumps({"weights": description, "sources": support.sources}))
        self._remember(key, description)
        return key, description, bank

    def pairs(self, support: Support) -> list[Sample]:
        """The support's pairs as the model sees them: whole, or cut into the tiles the targets are cut into."""
        return tile_samples(support.samples, self.inferer.tile) if self.inferer else support.samples

    def _check_loss(self, bank: EpisodeBank, episodes: list[dict]) -> float:
        """Mean Dice loss of fixed episodes of the fine-tune's bank (no gradient, eval mode)."""
        net, loss = EpisodeNet(self.model, bank).eval(), DiceLoss(sigmoid=True)
        with torch.no_grad():
            return float(np.mean([loss(*net(e)).item() for e in episodes]))

    def _remember(self, key: str, description: str) -> None:
        self._keep(self._states, key, (self._snapshot(), description))

    def _snapshot(self) -> dict[str, Tensor]:
        """A copy of the model's trainable weights (PPG + LoRA) as they are now."""
        return {k: v.clone() for k, v in trainable_state(self.model).items()}

    def _keep(self, cache: OrderedDict, key: str, value) -> None:
        """Put ``value`` in a least-recently-used cache of ``memory`` entries."""
        cache[key] = value
        while len(cache) > self.memory:
            cache.popitem(last=False)

    # --- support -------------------------------------------------------------------------------------------------
    def prepare(self, support: Support) -> tuple[SupportEmbedding, dict]:
        """Weights and support encoding for ``support`` (cached), loaded and ready to segment. Call under
        ``self.lock`` together with the segmentation that uses them."""
        start = time.monotonic()
        key, description, bank = self._weights_for(support)
        full = f"{key}/{support.key}"
        cached = full in self._embeddings
        if cached:
            embedding = self._embeddings[full]
            self._embeddings.move_to_end(full)
        elif self.video:  # SAM 2's conditioning memories of the support slices and the PPG embedding
            embedding = video_support(self.model, support)
        elif bank is not None and self.inferer is None:  # the fine-tune's view 0: the support as read, encoded
            index = list(range(len(bank)))
            with torch.no_grad():
                embedding = self.model.encode_prepared_support(
                    bank.x[0], bank.masks[0], bank.features(self.model, 0, index)
                )
        else:
            embedding = encode_samples(self.model, self.pairs(support), support.label_ids)
        if not cached:
            self._keep(self._embeddings, full, embedding)
        info = {
            "weights": description,
            "support_cached": cached,
            "support_pairs": len(support.samples),
            "support": support.sources,
            "prepare_seconds": round(time.monotonic() - start, 2),
        }
        return embedding, info

    def study_support(self, studies: Sequence[Study], label_ids: Sequence[int]) -> Support:
        """The support set of labelled studies: up to ``support_slices`` slices of each volume that show an object
        (2D images as they are). Kept in memory per file version, so a repeated request reads no study again."""
        ids = list(label_ids)
        stamps = [s.stamp() for s in studies]
        key = digest(stamps, ids, self.axis, self.support_slices)
        with self._supports_lock:
            if key in self._supports:
                self._supports.move_to_end(key)
                return self._supports[key]
        items = [{"image": str(s.image), "label": str(s.label)} for s in studies]
        samples = load_samples(items, axis=self.axis, max_slices=self.support_slices)
        samples = [s for s in samples if s.shows(ids)]
        missing = [o for o in ids if not any(o in s.shows(ids) for s in samples)]
        if missing:
            raise LookupError(
                f"label id(s) {missing} appear in no support study ({', '.join(s.id for s in studies)}): nothing "
                f"shows what to segment"
            )
        sources = [Path(s.source).name for s in samples]
        support = Support(samples, ids, key, same_study=len(studies) < 2, sources=sources, stamps=stamps)
        with self._supports_lock:
            self._keep(self._supports, key, support)
        return support

    def slice_support(self, image: Tensor, label: Tensor, label_ids: Sequence[int], name: str) -> Support:
        """The support set of slices a user labelled in the volume being segmented: (C, *spatial) image and its
        (*spatial) label map, 0 on unlabelled slices."""
        ids = list(label_ids)
        slices, labels = as_slices(image, self.axis), as_slices(label[None], self.axis)[:, 0]
        drawn = [z for z in range(len(labels)) if bool(labels[z].bool().any())]
        samples = [Sample(slices[z].float(), labels[z].long(), f"{name}#{self.axis}:{z}") for z in drawn]
        samples = [s for s in samples if s.shows(ids)]
        if not samples:
            raise ValueError(f"no slice of the uploaded label shows label id(s) {ids}: label at least one slice")
        key = digest(name, hashlib.sha1(label.numpy().tobytes()).hexdigest(), ids, self.axis)
        return Support(samples, ids, key, same_study=True, sources=[s.source for s in samples], drawn=True)

    # --- encoding ahead of need ----------------------------------------------------------------------------------
    def features_key(self, study: Study) -> str:
        return digest("features/1", self.model.config, self.axis, Study(study.id, study.image).stamp())

    def study_features(self, study: Study, image: Tensor | None = None) -> Features | None:
        """The encoder's features of every slice of a volume study, from the disk cache or computed now (and kept);
        None for 2D images or when the cache is off. Encoding holds the model's lock one slice at a time, so other
        requests are served in between; a study being encoded by one thread is waited for, not encoded twice."""
        if self.features is None:
            return None
        key = self.features_key(study)
        with self.lock:
            busy = self._encoding.setdefault(key, threading.Lock())
        with busy:
            found = self.features.get(key)
            if found is not None:
                return found
            image = read_image(study.image) if image is None else image
            if image.dim() != 4:
                return None
            start = time.monotonic()
            found = encode_slices(self.model, image, self.axis, lock=self.lock)
            self.features.put(key, found)
            logger.info(f"encoded {study.id} ({len(found.embed)} slices) in {time.monotonic() - start:.0f} s")
            return found

    def prefetch(self, study: Study) -> None:
        """Encode ``study`` in the background (`study_features`), after the studies already asked for."""
        if self.features is None or self.features_key(study) in self.features:
            return
        self._queue.put(study)
        with self.lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._prefetch_loop, name="ppgseg-prefetch", daemon=True)
                self._worker.start()

    def _prefetch_loop(self) -> None:
        while True:
            study = self._queue.get()
            try:
                self.study_features(study)
            except Exception as err:  # a bad study must not stop the worker; its request will report it
                logger.warning(f"could not encode {study.id} ahead of need: {err}")
            finally:
                self._queue.task_done()

    # --- similarity ----------------------------------------------------------------------------------------------
    def vector(self, study: Study, image: Tensor | None = None) -> Tensor:
        """The study's similarity vector: unit-norm mean of the backbone's pooled features on a few slices
        (computed once per image version, kept on disk). ``image``: the study's image when already read."""
        key = f"{self.model.config.get('backbone')}|{self.axis}|{Study(study.id, study.image).stamp()}"
        if key not in self._vectors:
            slices = as_slices(read_image(study.image) if image is None else image, self.axis)
            pooled = []
            for z in sample_slices(len(slices)):
                x, _ = self.model.backbone.preprocess(to_byte_range(slices[z])[None])
                with torch.no_grad():
                    pooled.append(self.model.encode_images(x.to(self.model.backbone.device)).embed.mean(dim=(2, 3))[0])
            self._vectors[key] = F.normalize(torch.stack(pooled).mean(0).cpu(), dim=0)
            self._save_vectors()
        return self._vectors[key]

    def most_similar(
        self, target: Study, candidates: Sequence[Study], k: int, image: Tensor | None = None
    ) -> list[Study]:
        """The ``k`` candidates most similar to ``target`` (cosine of `vector`), most similar first."""
        with self.lock:
            v = self.vector(target, image)
            scored = sorted(candidates, key=lambda c: (-float(v @ self.vector(c)), c.id))
        return scored[:k]

    def shows(self, study: Study) -> set[int]:
        """Label ids present in a labelled study's label file (cached per file version)."""
        key = study.stamp()
        if key not in self._shows:
            label = read_image(study.label)
            self._shows[key] = {int(v) for v in torch.unique(label.as_tensor()).tolist() if v != 0}
        return self._shows[key]

    def _load_vectors(self) -> dict[str, Tensor]:
        path = self.cache_dir / "vectors.pt"
        return torch.load(path, weights_only=True) if path.is_file() else {}

    def _save_vectors(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / "vectors.pt.tmp"
        torch.save(self._vectors, tmp)
        tmp.replace(self.cache_dir / "vectors.pt")

    # --- segmentation --------------------------------------------------------------------------------------------
    def segment(
        self, image: Tensor, support: Support, *, skip: Sequence[int] = (), study: Study | None = None
    ) -> tuple[Tensor, dict]:
        """Label map of a 2D image or volume (C, *spatial) from ``support``; slices in ``skip`` are left 0. ``study``:
        the datastore study ``image`` was read from, whose encoder features are then cached (`study_features`)."""
        start = time.monotonic()
        features = None
        if study is not None and image.dim() == 4:
            cached = self.features is not None and self.features_key(study) in self.features
            features = self.study_features(study, image)
        with self.lock:
            embedding, info = self.prepare(support)
            if features is not None:
                info["study_encoding"] = "cached" if cached else f"encoded now ({time.monotonic() - start:.1f} s)"
            start = time.monotonic()
            if self.video and image.dim() == 4:
                label = self._propagate(image, embedding, support.label_ids, skip)
                info["propagation"] = "SAM 2 memory, both ways from the middle slice"
            else:
                label = segment_image(
                    self.model, image, embedding, support.label_ids, axis=self.axis, skip=skip, features=features,
                    inferer=self.inferer, min_carried=self.min_carried, box_refine=self.box_refine,
                    z_stride=self.z_stride if features is not None else 1,
                )  # fmt: skip
            info["segment_seconds"] = round(time.monotonic() - start, 2)
        return label, info

    def _propagate(self, image: Tensor, support: VideoSupport, label_ids: Sequence[int], skip: Sequence[int]) -> Tensor:
        """A volume's label map by SAM 2 propagation over its slices, from the middle slice both ways (or from the
        middle of the slices to segment); slices in ``skip`` are left 0."""
        slices = as_slices(image, self.axis)
        todo = [z for z in range(len(slices)) if z not in set(skip)]
        out = torch.zeros((len(slices), *slices.shape[2:]), dtype=torch.uint8)
        if todo:
            out[todo] = label_clip(self.model, slices[todo], support, label_ids, len(todo) // 2)
        return out.movedim(0, self.axis)

    def confidence(self, image: Tensor, support: Support, slices: int = 3) -> float:
        """The mask decoder's mean predicted IoU over the objects on a few slices of ``image``: low means unsure."""
        with self.lock:
            embedding, _ = self.prepare(support)
            stack = as_slices(image, self.axis)
            picked = torch.stack([to_byte_range(stack[z]) for z in sample_slices(len(stack), slices)])
            with torch.no_grad():
                _, iou = self.model.segment(picked, embedding, with_iou=True)
        return float(iou.mean())
