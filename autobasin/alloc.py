"""Handing memory the process freed back to the operating system.

glibc's ``malloc`` serves a large request from its own ``mmap`` (returned to the
system on ``free``) only above a threshold that it raises, up to 32 MiB, to the
size of every such block freed. Once a process has freed one large tensor,
tensors up to that size come from the heap, where freed ones stay resident until
``malloc_trim`` returns them. We call it at a few points where much was just
freed (between weight matching's two starts, after its greedy start), not in
loops: trimmed pages cost a page fault each when used again. We do not set
``M_MMAP_THRESHOLD`` instead: that would change the allocator for the whole
process, for good. Elsewhere than on glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_freed() -> None:
    """Return the heap's free pages to the system (glibc); nothing elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
