"""A process-wide allocator setting for CPU inference: keep freed memory for reuse instead of unmapping it.

PyTorch's CPU allocator is plain ``malloc`` / ``free``, once per tensor. glibc serves blocks above its mmap
threshold (128 KiB at start) with ``mmap`` and returns them to the kernel when they are freed, and trims the top of
its heap likewise, so a network whose activations are megabytes page-faults all of them in again on every forward
pass: the kernel zero-fills each page at first touch. OpenVINO and onnxruntime keep their own arenas and do not pay
this. Measured on EfficientDet-Lite0 at 320 px, compiled, one thread (docs/benchmarks.md, "Deployment backends"):
network 45.2 ms -> 31.6 ms; the 16->96 channel 1x1 conv at 160x160, which writes 9.8 MB, went from 4.3 ms to its
arithmetic cost. jemalloc / tcmalloc (``LD_PRELOAD``), which Intel's PyTorch tuning guide recommends for the same
reason, do the same; this needs nothing installed.

The price is that the process keeps the memory it peaked at (for reuse by the next call) instead of giving it back.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters and glibc's ceiling on the mmap threshold on 64-bit systems.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20
_TRIM_THRESHOLD = 2**31 - 1  # an int: never trim the heap top back to the kernel

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to serve blocks up to 32 MiB from its heap and never trim the heap, so that freed
    activations are reused rather than page-faulted in again (see the module docstring). Idempotent; returns whether
    the setting is in force (``False`` off Linux / glibc, e.g. musl or macOS, where it is not needed or not known)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc
            return False
        _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
        log.debug("glibc malloc: retain freed memory up to %d MiB blocks: %s", _MMAP_THRESHOLD_MAX >> 20, _applied)
    return _applied
