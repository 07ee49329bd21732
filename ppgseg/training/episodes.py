"""Episodic few-shot training: the training set in augmented views, its encoder features cached when the encoder is
frozen, and the module that turns one episode into logits and ground truth."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..backbones.base import Features, encoder_frame
from ..backbones.cache import EncodingCache, encoder_fingerprint, tensor_digest
from ..data.contract import Sample
from ..data.episodes import EpisodeSampler, PairAugment
from ..data.intensity import to_byte_range
from ..modeling.checks import check_in_frame
from ..modeling.proxy_sam import ProxyPromptSAM

logger = logging.getLogger("ppgseg")
FEATURE_CACHE_BYTES = 48 * 2**30  # a training bank's features on disk: about 4 MB per LiteMedSAM image


class EpisodeBank:
    """Training samples in the encoder's frame, in ``views`` augmented versions, with their features.

    View 0 is the data as read; each further view is one draw of the paper's augmentation applied to every sample.
    An episode takes its whole support set from one view (one consistent draw for all support pairs) and its target
    from another, so that caching does not cost the augmentation its point. Where the image encoder has no LoRA its
    features are computed once here (the `cpu` preset); otherwise they are computed per episode, with gradients.

    Args:
        model: the ProxyPromptSAM being trained.
        samples: labelled 2D samples (`load_samples`).
        label_ids: the dataset's objects; masks are stored one channel per id in this order.
        views: number of views (>= 1).
        same_study: let supports come from the target's own study (`EpisodeSampler`).
        feature_cache: a folder (or `EncodingCache`) where the cached features of each view are kept, keyed by the
            view's pixels and the image encoder's weights, so that a resumed run or another run over the same data
            does not encode it again (None: kept in memory only).
    """

    def __init__(
        self,
        model: ProxyPromptSAM,
        samples: list[Sample],
        label_ids: Sequence[int],
        *,
        views: int = 3,
        seed: int = 0,
        same_study: bool = False,
        feature_cache: str | Path | EncodingCache | None = None,
    ) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.label_ids = list(label_ids)
        self.sampler = EpisodeSampler(samples, self.label_ids, num_support=1, seed=seed, same_study=same_study)
        rng = np.random.default_rng(seed)
        draws = [None] + [PairAugment(rng) for _ in range(views - 1)]
        backbone = model.backbone
        xs, ms = [], []
        for v, draw in enumerate(draws):
            vx, vm = [], []
            for s in samples:
                img, masks = to_byte_range(s.image), s.masks(self.label_ids)
                img, masks = draw(img, masks) if draw is not None else (img, masks)
                x, m = encoder_frame(backbone, img, masks)
                check_in_frame(masks, m[0], f"training sample {s.source} (augmentation view {v})")
                vx.append(x[0])
                vm.append(m[0])
            xs.append(torch.stack(vx))
            ms.append(torch.stack(vm))
        self.x, self.masks = torch.stack(xs), torch.stack(ms)  # (V, M, 3, S, S), (V, M, L, S, S)
        self.shows = self.masks.flatten(3).amax(3) > 0  # (V, M, L): what each view of each sample still shows
        self.cached = not model.encoder_trains
        self.cache = [self._encode(model, x, feature_cache) for x in self.x] if self.cached else None

    @staticmethod
    def _encode(model: ProxyPromptSAM, x: Tensor, store: str | Path | EncodingCache | None) -> Features:
        if store is None:
            return model.encode_images(x)
        store = store if isinstance(store, EncodingCache) else EncodingCache(store, FEATURE_CACHE_BYTES)
        key = f"bank-{encoder_fingerprint(model.backbone)}-{tensor_digest(x)}"
        found = store.get(key)
        if found is None:
            found = model.encode_images(x)
            store.put(key, found)
            logger.info(f"encoded {len(x)} training images, kept in {store.path(key)}")
        return found.to(x.device)

    @property
    def views(self) -> int:
        return self.x.shape[0]

    def __len__(self) -> int:
        return self.x.shape[1]

    def subset(self, index: list[int]) -> EpisodeBank:
        """The same bank restricted to the samples at ``index``, without encoding anything again."""
        sub = copy.copy(self)
        sub.x, sub.masks = self.x[:, index], self.masks[:, index]
        sub.cache = [f.select(index) for f in self.cache] if self.cache is not None else None
        sub.sampler = copy.copy(self.sampler)
        sub.sampler.subjects = [self.sampler.subjects[i] for i in index]
        sub.sampler.shows = [self.sampler.shows[i] for i in index]
        sub.sampler.sources = [self.sampler.sources[i] for i in index]
        sub.shows = self.shows[:, index]
        if len(set(sub.sampler.subjects)) < 2 and not self.sampler.same_study:
            raise ValueError(f"a subset of {len(index)} sample(s) from one study cannot make episodes")
        return sub

    def features(self, model: ProxyPromptSAM, view: int, index: list[int]) -> Features:
        if self.cache is not None:
            return self.cache[view].select(index)
        return model.encode_images(self.x[view, index])

    def draw(self, rng: np.random.Generator, num_support: int) -> dict:
        """A random episode: indices, label ids and the two views (different ones where there are several)."""
        d = self.sampler.draw(rng, num_support)
        view_t, view_s = (int(v) for v in rng.choice(self.views, 2, replace=self.views < 2))
        return {
            "target": d.target,
            "support": d.support,
            "objects": d.objects,
            "view_t": self.target_view(d.target, d.objects, view_t),
            "view_s": view_s,
        }

    def target_view(self, target: int, objects: list[int], view: int) -> int:
        """``view``, or the first view in which the target still shows every requested object that its sample shows
        (an augmentation may rotate a small object out of the frame); view 0, the data as read, always does."""
        want = [self.label_ids.index(o) for o in objects if o in self.sampler.shows[target]]
        for v in (view, *range(self.views)):
            if bool(self.shows[v, target, want].all()):
                return v
        raise ValueError(f"training sample {self.sampler.sources[target]}: objects {want} are empty in every view")


def as_banks(bank: EpisodeBank | Sequence[EpisodeBank]) -> list[EpisodeBank]:
    banks = list(bank) if isinstance(bank, list | tuple) else [bank]  # one bank of any kind, or several
    if not banks:
        raise ValueError("no training data: give at least one EpisodeBank")
    return banks


class EpisodeNet(nn.Module):
    """One episode -> (low-res logits (1, N, h, w), ground truth of the same shape). Wrapping the model in a module
    whose ``forward`` runs a whole episode is what DistributedDataParallel needs to synchronise its gradients.

    ``bank`` may be a list (several datasets, each with its own labels): an episode names its bank."""

    def __init__(self, model: ProxyPromptSAM, bank: EpisodeBank | Sequence[EpisodeBank]) -> None:
        super().__init__()
        self.model, self.banks = model, as_banks(bank)

    def forward(self, episode: dict) -> tuple[Tensor, Tensor]:
        model, bank = self.model, self.banks[episode.get("bank", 0)]
        channels = [bank.label_ids.index(o) for o in episode["objects"]]
        vs, vt, support, target = episode["view_s"], episode["view_t"], episode["support"], [episode["target"]]
        sup = model.encode_prepared_support(
            bank.x[vs, support], bank.masks[vs, support][:, channels], bank.features(model, vs, support)
        )
        logits = model.segment_features(bank.features(model, vt, target), sup)
        truth = F.interpolate(bank.masks[vt, target][:, channels], size=logits.shape[-2:], mode="area")
        return logits, (truth > 0.5).float()

    def train(self, mode: bool = True) -> EpisodeNet:
        self.model.train(mode)
        return self


class EpisodeDataset(Dataset):
    """``length`` random episodes per epoch for a DataLoader (``batch_size=None``); each process of a distributed run
    draws its own (seeded by ``seed`` and ``rank``). With several banks, each episode comes from one of them: drawn
    uniformly, or with probability proportional to ``bank_weights`` (one per bank), so that a family of banks keeps a
    fixed share of the episodes however many banks it has."""

    def __init__(
        self,
        bank: EpisodeBank | Sequence[EpisodeBank],
        num_support: int,
        length: int,
        *,
        seed: int = 0,
        rank: int = 0,
        bank_weights: Sequence[float] | None = None,
    ) -> None:
        if length < 1:
            raise ValueError(f"episodes per epoch must be >= 1, got {length}")
        self.banks, self.num_support, self.length = as_banks(bank), num_support, length
        self.p = bank_shares(bank_weights, len(self.banks))
        self.rng = np.random.default_rng([seed, rank])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        b = draw_bank(self.rng, len(self.banks), self.p)
        return {**self.banks[b].draw(self.rng, self.num_support), "bank": b}


def bank_shares(weights: Sequence[float] | None, banks: int) -> np.ndarray | None:
    """Bank weights as probabilities (None: uniform); wrong counts or signs raise, naming them."""
    if weights is None:
        return None
    w = np.asarray(list(weights), dtype=np.float64)
    if w.shape != (banks,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"bank_weights must be {banks} non-negative numbers, not all 0 (one per bank), got {list(weights)}"
        )
    return w / w.sum()


def draw_bank(rng: np.random.Generator, banks: int, p: np.ndarray | None) -> int:
    """The bank an episode comes from: uniform (as before weights existed), or by the shares ``p``."""
    if p is None:
        return int(rng.integers(banks))
    return int(rng.choice(banks, p=p))
