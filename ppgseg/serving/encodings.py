"""Encoder features of whole studies, computed once per image version and kept on disk, ahead of need in a
background thread: a request on an encoded study runs only the PPG and the mask decoder."""

from __future__ import annotations

import logging
import queue
import threading
import time

from torch import Tensor

from ..backbones.base import Features
from ..backbones.cache import EncodingCache
from ..inference.slices import encode_slices
from ..io import read_image
from ..modeling.proxy_sam import ProxyPromptSAM
from .studies import Study, digest

logger = logging.getLogger("ppgseg")


class StudyEncoder:
    """Encodes volume studies slice by slice along ``axis`` into an `EncodingCache`, on request or ahead of need.

    Encoding holds the model's ``lock`` one slice at a time, so other requests are served in between; a study being
    encoded by one thread is waited for, not encoded twice."""

    def __init__(self, model: ProxyPromptSAM, cache: EncodingCache, lock: threading.RLock, axis: int) -> None:
        self.model, self.cache, self.lock, self.axis = model, cache, lock, axis
        self._encoding: dict[str, threading.Lock] = {}  # study key -> held while that study is being encoded
        self._queue: queue.Queue[Study] = queue.Queue()
        self._worker: threading.Thread | None = None

    def key(self, study: Study) -> str:
        return digest("features/1", self.model.config, self.axis, Study(study.id, study.image).stamp())

    def __contains__(self, study: Study) -> bool:
        return self.key(study) in self.cache

    def features(self, study: Study, image: Tensor | None = None) -> Features | None:
        """The encoder's features of every slice of a volume study, from the cache or computed now (and kept); None
        for 2D images."""
        key = self.key(study)
        with self.lock:
            busy = self._encoding.setdefault(key, threading.Lock())
        with busy:
            found = self.cache.get(key)
            if found is not None:
                return found
            image = read_image(study.image) if image is None else image
            if image.dim() != 4:
                return None
            start = time.monotonic()
            found = encode_slices(self.model, image, self.axis, lock=self.lock)
            self.cache.put(key, found)
            logger.info(f"encoded {study.id} ({len(found.embed)} slices) in {time.monotonic() - start:.0f} s")
            return found

    def prefetch(self, study: Study) -> None:
        """Encode ``study`` in the background, after the studies already asked for."""
        if study in self:
            return
        self._queue.put(study)
        with self.lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._prefetch_loop, name="ppgseg-prefetch", daemon=True)
                self._worker.start()

    def join(self) -> None:
        """Wait until every study asked for ahead of need is encoded."""
        self._queue.join()

    def _prefetch_loop(self) -> None:
        while True:
            study = self._queue.get()
            try:
                self.features(study)
            except Exception as err:  # a bad study must not stop the worker; its request will report it
                logger.warning(f"could not encode {study.id} ahead of need: {err}")
            finally:
                self._queue.task_done()
