"""Process settings that make CPU inference and training faster, opt-in: the entry points that want them (the
bundle's configs, the MONAI Label app, the scripts, the tests) call `pad_heap` first; importing ppgseg changes nothing.

glibc's malloc hands freed memory back to the kernel and asks for it again on the next large allocation, so every
encoder forward pays page faults for its activations anew. Three settings keep that memory:
- a 1 GiB top pad on the main heap (M_TOP_PAD): freed heap memory stays with the process;
- one malloc arena for all threads (M_ARENA_MAX = 1): a worker thread (the MONAI Label server runs inference in
  them) otherwise gets its own small heaps, which glibc shrinks after each forward. glibc fixes its arena limit when
  the first thread allocates, so this reaches only threads of a process that calls it before starting any;
  elsewhere (the MONAI Label server) start the process with MALLOC_ARENA_MAX=1 in the environment;
- blocks up to 32 MiB from the heap, not from mmap (M_MMAP_THRESHOLD). Setting any of these parameters turns off
  glibc's own rising mmap threshold, so without this one every activation above 128 KiB was mapped and unmapped
  again on each forward: 2 CPU cores, LiteMedSAM's encoder at 256x256 2.64 -> 1.29 s per image (system time
  6.1 -> 0.0 s over 3 forwards), its mask decoder 153 -> 93 ms per object, measured in one process each.
The cost is up to 1 GiB of freed memory kept by the process. ``PPGSEG_HEAP_PAD_MB`` sets the pad (0: leave malloc
alone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -2, -3, -8  # glibc mallopt parameters
MMAP_FROM = 32 * 2**20  # the largest threshold glibc accepts on 64-bit systems
logger = logging.getLogger(__name__)
padded_mb: int | None = None  # the top pad `pad_heap` set in this process (None: malloc left as glibc starts it)


def pad_heap(megabytes: int | None = None) -> bool:
    """Set glibc's M_TOP_PAD (``megabytes``, default ``PPGSEG_HEAP_PAD_MB`` or 1024), M_ARENA_MAX (1) and
    M_MMAP_THRESHOLD (32 MiB); True if they were set. A no-op (False) off glibc or at 0."""
    if megabytes is None:
        megabytes = int(os.environ.get("PPGSEG_HEAP_PAD_MB", "1024"))
    if megabytes <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        done = bool(
            mallopt
            and mallopt(M_TOP_PAD, min(megabytes, 2047) * 2**20)
            and mallopt(M_ARENA_MAX, 1)
            and mallopt(M_MMAP_THRESHOLD, MMAP_FROM)
        )
    except OSError:
        done = False
    global padded_mb
    padded_mb = megabytes if done else padded_mb
    logger.debug(f"heap top pad {megabytes} MB, one arena, mmap from 32 MiB: {'set' if done else 'not available here'}")
    return done
