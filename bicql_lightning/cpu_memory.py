"""CPU training keeps the memory of freed tensors for the next iteration.

On Linux, glibc's ``malloc`` serves a block above its mmap threshold (128 KiB, rising with
use up to 32 MiB) with freshly mapped pages and unmaps them on ``free``, and gives the top of
its heap back to the system once more than ``M_TRIM_THRESHOLD`` of it is free. A training
iteration allocates and frees the same large activations every time (at the benchmark's
sizes one Q layer's activations are 5.8 MB for one seed and 46 MB for eight stacked seeds),
so every iteration maps them again and the kernel faults in and zeroes each 4 KiB page
before the first write: time spent on memory that the last iteration just had.
PyTorch caches device memory on a GPU, not host memory on a CPU.

:func:`keep_freed_memory` sets glibc to serve every block from its heap (``M_MMAP_MAX = 0``)
and to keep freed memory (``M_TRIM_THRESHOLD`` at its largest), so a freed block is reused
without page faults, as a caching allocator would. The process keeps its peak heap until it
exits. Measured on a 2-core Intel Xeon, float32 (docs/benchmark.md): one seed's iteration
7–18 % faster, eight seeds batched in one process (:mod:`bicql_lightning.seeds`) 1.7–1.8×.
Only the allocator changes: every tensor, and so every trained number, is the same.

Training modules call it when they fit on a CPU; ``BICQL_KEEP_FREED_MEMORY=0`` in the
environment turns it off. Elsewhere (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: The largest value mallopt takes (an int): the heap's top is never given back.
NEVER_TRIM = 2**31 - 1
#: Environment variable that turns the setting off when it is "0", "false" or "no".
ENV = "BICQL_KEEP_FREED_MEMORY"

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory in this process (once; later calls are free).
    Returns whether the setting is in effect: false where the platform has no glibc or the
    environment turned it off."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Either setting alone is slower than glibc's default
    # (it freezes the rising mmap threshold at 128 KiB); glibc accepts both values.
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    return _applied


__all__ = ["ENV", "keep_freed_memory"]
