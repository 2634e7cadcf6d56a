"""Keep freed host memory inside the process (Linux, glibc), so CPU training steps stop paying page faults.

By default glibc serves large allocations with fresh mmap()s and hands freed memory back to the
kernel. A training step allocates and frees the same large activation and gradient buffers every
time, so each step pays page faults and kernel zeroing for memory it just gave away: 8% of the CPU
step time of the benchmark model (BENCHMARKS.md). Raising the mmap threshold to glibc's maximum and
disabling trimming keeps those buffers in the heap for reuse. The cost is that the resident size
stays at its peak instead of shrinking between steps, which a training process reaches anyway.

A sharded run on CPU processes (train.sharding: fsdp) does the opposite by default,
``return_freed_host_memory``: its point is a per-rank footprint that falls with the number of ranks,
which retained transient buffers defeat there.

The setting is scoped to a run: ``clipx.train.loop.fit`` applies it (``tune_host_memory``) when the run starts and
``release_host_memory`` puts glibc's default thresholds back and returns the retained memory when
the run ends, so a notebook that trains once does not keep a tuned allocator. (glibc cannot turn
its dynamic mmap threshold back on once it was set; the default value stays fixed instead.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems
NEVER_TRIM = 2**31 - 1
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # both thresholds' defaults (DEFAULT_MMAP_THRESHOLD_MIN, DEFAULT_TRIM_THRESHOLD)
RETURN_THRESHOLD = 4 * 1024 * 1024  # return_freed_host_memory: blocks above it are mapped, and unmapped when freed


def _mallopt():
    """glibc's mallopt, or None (not Linux, or a libc without it such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def retain_freed_host_memory() -> bool:
    """Tune glibc's malloc for this process (and the loader workers it forks); False where unavailable."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # Order matters: setting the trim threshold alone also freezes the mmap threshold at its 128 KiB
    # default, which makes every large tensor an mmap (much slower than doing nothing).
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def return_freed_host_memory() -> bool:
    """Tune glibc's malloc so that freed blocks above ``RETURN_THRESHOLD`` go back to the kernel at once
    (a sharded run's policy); False where unavailable.

    glibc's default threshold is dynamic: once a large mapped block is freed, blocks up to its size
    come from the heap and stay resident after they are freed. FSDP on CPU processes allocates and
    frees each unit's gathered weights and full-size gradients in turn, so with either the default
    or ``retain_freed_host_memory`` a rank keeps every unit's transient buffers resident and its peak
    does not fall with the number of ranks. A fixed threshold keeps the small allocations in the
    heap and maps the large ones, paying their page faults again at each use."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, RETURN_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD))


def tune_host_memory(train_cfg, device_type: str) -> bool:
    """Apply the run's policy (train.retain_host_memory; unset: retain, but return for
    train.sharding=fsdp on CPU processes, ``device_type`` "cpu": on GPUs FSDP's transient buffers
    are device memory); True when glibc was tuned and ``release_host_memory`` should undo it."""
    retain = train_cfg.retain_host_memory
    if retain is None:
        retain = not (train_cfg.sharding == "fsdp" and device_type == "cpu")
    return retain_freed_host_memory() if retain else return_freed_host_memory()


def release_host_memory() -> None:
    """Undo ``retain_freed_host_memory`` or ``return_freed_host_memory``: glibc's default thresholds
    (fixed), and the retained memory handed back."""
    mallopt = _mallopt()
    if mallopt is None:
        return
    mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
