"""Keep freed memory inside the process on CPU runs, for the next step to reuse.

Why: a training step on the CPU allocates and frees hundreds of activation buffers of 1 to
4 MB. glibc's malloc serves a buffer above its mmap threshold with a fresh mapping, and it
hands the top of the heap back to the kernel once more than its trim threshold is free. It
raises both thresholds as it sees large frees, but that did not settle for scoretk's steps:
an NCSNv2 step (ngf 32, batch 32, split across 2 threads) faulted 17,000 to 35,000 pages back
in, each zeroed by the kernel, where the reference code's step faulted at most 4,600. With
both thresholds raised the faults drop to a few hundred, and the split step takes 5 to 7%
less time (benchmarks/README.md).

The process then keeps its peak heap, which every step reaches anyway. Only glibc's malloc is
tuned, and not where the environment sets these thresholds itself (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_). A preloaded allocator (jemalloc, tcmalloc) does not read them.

`available_bytes` says how much memory is left, for the preflight checks of big requests.
"""
from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: in effect, never trim
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (idempotent). Returns whether
    they were set: False off glibc, or where the environment sets them itself."""
    if not sys.platform.startswith("linux") or any(os.environ.get(v) for v in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def available_bytes() -> int | None:
    """Memory this process can still get without swapping: the kernel's MemAvailable, or what
    the process's cgroup still allows if that is less; None where neither is known. For
    preflight checks, which refuse a request far beyond it before anything is written."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f, \
                open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                found.append(int(limit) - int(g.read().strip()))
    except (OSError, ValueError):
        pass
    return max(min(found), 0) if found else None
