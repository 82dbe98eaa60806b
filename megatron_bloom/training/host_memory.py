"""Keeping freed host memory in the process, for training on CPUs (CUDA's caching allocator does this on GPUs).

glibc hands every block above its mmap threshold (at most 32 MB) back to the kernel when it is freed, so each
step's large activations, logits and gradients are page-faulted in again on first touch: 30 ms for a 128 MB
tensor on 2 cores, about a tenth of a bloom-small step. With mmap off and trimming off, freed blocks stay in
the heap and the next step reuses them. The peak memory is unchanged; it is simply not returned between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_host_memory() -> bool:
    """Make this process's malloc reuse freed memory instead of returning it; False where the C library is
    not glibc (the setting is then left alone)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
