"""Keep large freed blocks in the process's heap instead of handing them back to the OS (glibc malloc, CPU runs).

A CPU training step allocates and frees several tensors the size of the LM head each step (V x d: 51 MB for
GPT-2's vocabulary in fp32: its weight gradient, the embedding's dense gradient and their sum). glibc serves a
block over its mmap threshold (which adapts, but never past 32 MB) with a fresh mapping and unmaps it on free, so
every step the kernel zero-fills and faults in each of those pages again: ~10-20 ms per such tensor on the
2-core build machine. `keep_freed_memory()` raises glibc's mmap and trim thresholds (`mallopt`), so those blocks
come from the heap and freed ones stay there for the next step, as jemalloc or tcmalloc (the allocators PyTorch's
CPU tuning guides suggest preloading) keep them. Measured on the suite's 4-layer model (2 threads, a process with
and one without, alternated 3 times, median of 9 steps each): a training step 5-25% faster (B=1, no thoughts
~117 -> ~89 ms; B=8, 16 thoughts ~652 -> ~602 ms).

It changes the whole process, so the library never calls it on import: the console scripts that train or
measure on the CPU do (`coconut-train`, the benchmark suite), unless COCONUT_KEEP_FREED_MEMORY=0. The cost is
memory: the process keeps its peak heap instead of returning freed blocks to the OS. Elsewhere than glibc it
does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

from .errors import CoconutError

__all__ = ["keep_freed_memory", "kept", "keep_unless_disabled", "glibc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_kept = False


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Serve allocations below `threshold` bytes from the heap and keep up to 2 GiB of freed heap (glibc's
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). True when glibc took both settings."""
    global _kept
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
        raise CoconutError(f"threshold must be a non-negative int of bytes, got {threshold!r}")
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    limit = (1 << 31) - 1
    ok = mallopt(_M_MMAP_THRESHOLD, min(threshold, limit)) == 1 and mallopt(_M_TRIM_THRESHOLD, limit) == 1
    _kept = _kept or ok
    return ok


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has gnu_get_libc_version and mallopt), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def kept() -> bool:
    """Whether keep_freed_memory() has taken effect in this process."""
    return _kept


def keep_unless_disabled() -> bool:
    """keep_freed_memory() unless COCONUT_KEEP_FREED_MEMORY is "0" or empty: what the console scripts call."""
    if os.environ.get("COCONUT_KEEP_FREED_MEMORY", "1") in ("", "0"):
        return False
    return keep_freed_memory()
