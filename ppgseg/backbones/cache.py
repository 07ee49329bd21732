"""Encoder features kept on disk: a size-bounded folder of feature files, and the fingerprint of the image encoder
that computed them (features of the same pixels from other weights are other features)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import torch

from .base import Backbone, Features


class EncodingCache:
    """Encoder features, one file per key in ``folder``, at most ``max_bytes`` in all (the least recently used go
    first). Files are written whole (a temporary file, then renamed)."""

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


def encoder_fingerprint(backbone: Backbone) -> str:
    """A digest of the image encoder's weights (the backbone's ``model.image_encoder``)."""
    h = hashlib.sha1(type(backbone).__name__.encode())
    for name, t in backbone.model.image_encoder.state_dict().items():
        h.update(name.encode())
        h.update(_bytes(t))
    return h.hexdigest()[:16]


def tensor_digest(x: torch.Tensor) -> str:
    return hashlib.sha1(_bytes(x)).hexdigest()[:16]


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
