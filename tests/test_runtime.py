"""Process settings applied on import (runtime.py)."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from ppgseg.runtime import pad_heap


def test_pad_zero_leaves_malloc_alone(monkeypatch) -> None:
    assert pad_heap(0) is False
    monkeypatch.setenv("PPGSEG_HEAP_PAD_MB", "0")
    assert pad_heap() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc only")
def test_pad_is_set_on_glibc() -> None:
    assert pad_heap(64) is True
    assert pad_heap() is True  # the default, as on import
