"""Handing the C heap's free pages back to the operating system between batches.

The networks allocate tensors whose sizes change with each batch (windows around peaks, tiles,
batch sizes). glibc's malloc serves buffers below its (self-raising) mmap threshold from the
heap, and freed heap memory of many sizes stays mapped: a long scan's RSS then creeps up with
the number of distinct shapes seen (about 2-3 MB a shape for the TLM, measured), although
nothing is kept. ``malloc_trim(0)`` returns the free pages. Pages handed back must be faulted in
again by the next batch (trimming after every batch cost joint about 6 % of its frames/s), so
:func:`release_free_heap` can wait until the process's RSS has grown by ``min_rss_growth`` bytes
since it last trimmed. Other C libraries (macOS, musl, Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["rss_bytes", "release_free_heap"]

#: RSS right after the last trim (process-wide, as the heap is)
_rss_after_trim = 0


@cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        logger.debug("no malloc_trim in this C library; freed heap memory stays mapped")
        return None


def rss_bytes() -> int | None:
    """This process's resident set size in bytes (Linux ``/proc``), None where unreadable."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_heap(min_rss_growth: int = 0) -> bool:
    """Return the C heap's free pages to the OS (glibc only), once the RSS has grown by at least
    ``min_rss_growth`` bytes since the last trim (0: now). True when it trimmed."""
    global _rss_after_trim
    trim = _malloc_trim()
    if trim is None:
        return False
    if min_rss_growth > 0:
        rss = rss_bytes()
        if rss is not None and rss - _rss_after_trim < min_rss_growth:
            return False
    trim(0)
    _rss_after_trim = rss_bytes() or 0
    return True
