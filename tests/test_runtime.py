"""Process settings for CPU speed (runtime.py), opt-in at the entry points."""

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


FAULTS = """
import ctypes, importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("runtime", sys.argv[1])
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)
libc = ctypes.CDLL(None)
if sys.argv[2] == "pad_heap":
    runtime.pad_heap(1024)
else:  # the top pad alone: any mallopt call stops glibc from raising its mmap threshold by itself
    libc.mallopt(runtime.M_TOP_PAD, 2**30)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 16 * 2**20
before = None
for _ in range(9):
    p = libc.malloc(n)
    libc.memset(p, 1, n)  # touch all 4,096 pages
    libc.free(p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if before is None else before
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc only")
def test_large_blocks_are_reused_not_mapped_anew() -> None:
    """A 16 MiB block allocated, filled and freed 8 times in a fresh process: after `pad_heap` its pages come back
    from the heap. With the top pad alone (what `pad_heap` set before it also set the mmap threshold) glibc maps
    every such block anew and faults on all 4,096 pages each round."""
    import subprocess

    import ppgseg.runtime

    def faults(mode: str) -> int:
        cmd = [sys.executable, "-c", FAULTS, ppgseg.runtime.__file__, mode]
        return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])

    assert faults("top_pad_only") > 6 * 4096
    assert faults("pad_heap") < 4096


def test_importing_ppgseg_leaves_malloc_alone() -> None:
    """A host process that imports ppgseg keeps its malloc settings; the entry points call `pad_heap` themselves."""
    import subprocess

    code = "import ppgseg, ppgseg.runtime as r; print(r.padded_mb)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "None"
    code = "import ppgseg.runtime as r; r.pad_heap(64); print(r.padded_mb)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == ("64" if sys.platform.startswith("linux") and ctypes.util.find_library("c") else "None")
