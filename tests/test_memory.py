"""dipid._memory: freed C-heap pages go back to the OS between batches (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from dipid._memory import release_free_heap

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's; elsewhere release_free_heap is a no-op")
def test_release_free_heap_returns_freed_heap_pages_to_the_os():
    # In a fresh interpreter, with glibc's mmap threshold raised to 32 MB (as the networks'
    # varying buffers raise it on their own), 1 MB arrays come from the heap; freeing all but the
    # last leaves ~100 MB of free pages mapped inside the heap until they are trimmed.
    code = textwrap.dedent("""
        import numpy as np
        from dipid._memory import release_free_heap, rss_bytes

        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6

        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        assert libc.mallopt(-3, 32 * 2**20) == 1  # M_MMAP_THRESHOLD
        assert libc.mallopt(-1, 2**30) == 1  # M_TRIM_THRESHOLD: free() alone keeps the pages
        release_free_heap()  # the baseline: RSS after a trim
        blocks = [np.ones(1_000_000 // 8 + k) for k in range(120)]
        del blocks[:-1]
        before = rss_mb()
        kept = release_free_heap(min_rss_growth=10 * 2**30)  # RSS grew less than 10 GiB: left alone
        after_kept = rss_mb()
        ok = release_free_heap(min_rss_growth=50 * 2**20)  # it grew by ~120 MB: trimmed
        print(kept, before - after_kept, ok, before - rss_mb(), rss_bytes() / 1e6, rss_mb())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    kept, kept_released, ok, released, rss_now, rss_statm = proc.stdout.split()
    assert kept == "False" and abs(float(kept_released)) < 5
    assert ok == "True"
    assert float(released) > 50, f"only {released} MB returned"
    assert abs(float(rss_now) - float(rss_statm)) < 1  # rss_bytes reads the same resident size


def test_release_free_heap_is_safe_to_call_anywhere():
    assert release_free_heap() is GLIBC
    assert release_free_heap() is GLIBC  # repeatable
