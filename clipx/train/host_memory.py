"""Keep freed host memory inside the process (Linux, glibc), so CPU training steps stop paying page faults.

By default glibc serves large allocations with fresh mmap()s and hands freed memory back to the
kernel. A training step allocates and frees the same large activation and gradient buffers every
time, so each step pays page faults and kernel zeroing for memory it just gave away: 8% of the CPU
step time of the benchmark model (BENCHMARKS.md). Raising the mmap threshold to glibc's maximum and
disabling trimming keeps those buffers in the heap for reuse. The cost is that the resident size
stays at its peak instead of shrinking between steps, which a training process reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems
NEVER_TRIM = 2**31 - 1


def retain_freed_host_memory() -> bool:
    """Tune glibc's malloc for this process (and the loader workers it forks); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    # Order matters: setting the trim threshold alone also freezes the mmap threshold at its 128 KiB
    # default, which makes every large tensor an mmap (much slower than doing nothing).
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
