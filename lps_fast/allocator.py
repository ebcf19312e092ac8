"""The CPU allocator setting of lps-fast's own processes: glibc malloc keeps freed memory.

By default glibc hands every block above its mmap threshold (at most 32 MB), and freed heap
memory above its trim threshold, back to the kernel, so the next allocation of that size faults
in fresh pages, about 0.6 ms per MB on a virtual machine. A training step allocates and frees the
same buffers every step: the n-body learned step of the CPU default model faults in about 1900
pages per step that way, and about 13 with freed memory kept (BENCHMARKS.md). jemalloc, tcmalloc
and torch's CUDA caching allocator keep freed memory; glibc does with ``M_MMAP_MAX = 0`` and a
huge ``M_TRIM_THRESHOLD``, at the price of a resident size that stays at its peak.

The library itself never changes the process's allocator: :func:`keep_freed_memory` is called by
the ``lps-fast`` commands that train (their own processes) and by the benchmarks.
``LPS_FAST_KEEP_FREED_MEMORY=0`` leaves glibc's defaults there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENVIRONMENT_VARIABLE = "LPS_FAST_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)

DEFAULT = "default"
KEPT = "glibc, freed memory kept"
UNAVAILABLE = "default (mallopt unavailable)"
PARTIAL = "glibc, no mmap for large blocks (trim threshold unchanged)"
DECLINED = f"default ({ENVIRONMENT_VARIABLE}=0)"

_setting = DEFAULT


def setting() -> str:
    """What this process's malloc does with freed memory, as :func:`keep_freed_memory` left it."""
    return _setting


def keep_freed_memory(honour_environment: bool = True) -> str:
    """Make glibc malloc keep freed memory (no mmap for large blocks, no trimming of the heap);
    returns :func:`setting`. A no-op where malloc is not glibc's (``mallopt`` is missing), and,
    with ``honour_environment``, where ``LPS_FAST_KEEP_FREED_MEMORY=0``. Idempotent."""
    global _setting
    if _setting != DEFAULT:
        return _setting
    if honour_environment and os.environ.get(ENVIRONMENT_VARIABLE, "1").strip() == "0":
        _setting = DECLINED
        return _setting
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        no_mmap = libc.mallopt(_M_MMAP_MAX, 0) == 1
        no_trim = no_mmap and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        no_mmap = no_trim = False
    _setting = KEPT if no_trim else PARTIAL if no_mmap else UNAVAILABLE
    return _setting
