"""Studies of a datastore and the support sets made of them: a few slices of each labelled study."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.contract import Sample, load_samples


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


def digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_slices(n: int, count: int = 3) -> list[int]:
    """``count`` evenly spaced indices inside ``range(n)`` (25 %, 50 %, 75 % for 3)."""
    return sorted({min(n - 1, int(n * (i + 1) / (count + 1))) for i in range(count)})


def keep(cache: OrderedDict, key: str, value, size: int) -> None:
    """Put ``value`` in a least-recently-used cache of ``size`` entries."""
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)


class SupportReader:
    """Makes support sets, slicing volumes along ``axis``: ``support_slices`` slices of each labelled study (evenly
    spaced among those that show an object), kept in memory per file version for ``memory`` support sets, so a
    repeated request reads no study again. Its own lock: reading a cached support waits for no segmentation."""

    def __init__(self, *, axis: int = 2, support_slices: int = 3, memory: int = 8) -> None:
        if not 0 <= axis <= 2:
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        if support_slices < 1:
            raise ValueError(f"support_slices must be >= 1, got {support_slices}")
        self.axis, self.support_slices, self.memory = axis, support_slices, memory
        self._supports: OrderedDict[str, Support] = OrderedDict()
        self._lock = threading.Lock()

    def studies(self, studies: Sequence[Study], label_ids: Sequence[int]) -> Support:
        """The support set of labelled studies (2D images as they are)."""
        ids = list(label_ids)
        stamps = [s.stamp() for s in studies]
        key = digest(stamps, ids, self.axis, self.support_slices)
        with self._lock:
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
        with self._lock:
            keep(self._supports, key, support, self.memory)
        return support
