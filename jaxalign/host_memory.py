"""Keep freed host memory in the process for reuse (glibc), so XLA:CPU steps stop page-faulting.

XLA:CPU allocates the temporaries of every call of an executable afresh (one block per call,
hundreds of MiB to GiB for a training step) and frees them when the call ends. glibc serves
blocks above its mmap threshold (at most 32 MiB) with ``mmap`` and returns them with
``munmap``, so each step maps, faults in and zeroes its whole working memory again: about
0.25-0.5 million page faults and 0.5-1 s of kernel time per step of the benchmark's model
(docs/performance.md), and elementwise passes over fresh arrays run 2.5-4x slower than over
reused ones.

:func:`retain_freed_memory` sets four ``mallopt`` parameters: ``M_ARENA_MAX = 1`` (every
thread allocates from the main heap), ``M_MMAP_MAX = 0`` (large blocks come from that heap
too, not from ``mmap``), ``M_TRIM_THRESHOLD = -1`` (the heap is never shrunk) and
``M_TOP_PAD = 1 GiB`` (the heap grows in large steps: with the default, steps whose blocks
come in a different order kept growing it, and new memory faults like fresh maps; untouched
pad costs no RAM). Freed blocks are then reused by the next step; the process keeps its peak
footprint until it exits, which a training process reaches every step anyway. Call it before the JAX backend
starts its threads (threads that already own an arena keep it). Device memory on GPU/TPU
is not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["retain_freed_memory"]

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def retain_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse (see the module docstring). Returns
    True if every setting was accepted, False (changing nothing) where the C library is not
    glibc."""
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 2**30))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
