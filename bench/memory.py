"""Peak resident memory of a piece of work, measured by the Linux kernel (VmHWM).

Writing "5" to /proc/self/clear_refs resets the process's high-water mark, so the peak of one call
can be read without starting a new process. glibc's malloc raises its mmap threshold dynamically
(up to 32 MiB) after large frees and then keeps freed memory resident; fixing the threshold at
256 KiB makes every large tensor an mmap that is returned on free, so resident memory follows live
tensor memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's


def reset_malloc_for_measurement(size: int = 256 * 1024) -> None:
    """Call before warming up what is measured. Also undoes what a training run in the same process
    did (clipx.train.host_memory tunes malloc the other way, to keep freed memory), and hands that
    memory back (malloc_trim): reused free chunks would not show up as resident growth."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, size)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measurements are coarser, not wrong
        pass


reset_malloc_for_measurement()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_bytes_during(work) -> int:
    """Bytes by which peak resident memory rose above the resident memory before ``work()``."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    work()
    peak = _status_kib("VmHWM")
    return max(0, peak - before) * 1024
