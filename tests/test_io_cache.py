"""Frames kept in memory between a scan's passes (``open_scan(..., cache_bytes=N)``, issue 14).

The packed frames read back exactly as stored, whatever the dtype and values; a scan keeping its
frames gives the same arrays, bad pixels and warnings as one reading the file each time, and
reads each kept frame from the file once.
"""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

from dipid.errors import BadPixelWarning
from dipid.io import open_scan
from dipid.io.scan import _pack_frame, _PackedFrame, _unpack_frame


def _round_trip(frame: np.ndarray) -> np.ndarray:
    out = np.empty(frame.shape, frame.dtype)
    _unpack_frame(_pack_frame(frame), out)
    return out


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"])
def test_packed_frames_read_back_exactly(dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    frame = rng.poisson(30, (37, 41)).astype(dtype)
    frame[0, :5] = [info.min, info.max, info.min + 1, info.max - 1, 0]  # the widest steps there are
    frame[3, 3] = min(255, info.max)
    frame[rng.random(frame.shape) < 0.01] = info.max // 2  # a few bright pixels
    packed = _pack_frame(frame)
    assert isinstance(packed, _PackedFrame)
    np.testing.assert_array_equal(_round_trip(frame), frame)


def test_packing_shrinks_counting_frames_and_keeps_the_rest_whole():
    rng = np.random.default_rng(1)
    counts = rng.poisson(40, (200, 300)).astype(np.int32)
    counts[:, 100:103] = -1  # module gaps
    counts[50, 50] = 10**6  # a hot pixel
    packed = _pack_frame(counts)
    assert packed.nbytes < counts.nbytes / 3
    np.testing.assert_array_equal(_round_trip(counts), counts)
    for other in (rng.normal(size=(20, 30)).astype(np.float32),  # floats: kept as a copy
                  np.arange(12, dtype=">i4").reshape(3, 4),  # foreign byte order: a copy too
                  np.zeros((0, 5), np.int32)):
        packed = _pack_frame(other)
        assert isinstance(packed, np.ndarray) and packed is not other
        np.testing.assert_array_equal(_round_trip(other), other)


def _write_scan(path, frames: np.ndarray) -> None:
    with h5py.File(path, "w") as h5:
        entry = h5.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "data"
        data.create_dataset("data", data=frames, chunks=(1, *frames.shape[1:]), compression="gzip")


@pytest.fixture
def scan_file(tmp_path):
    rng = np.random.default_rng(2)
    frames = rng.poisson(20, (9, 40, 50)).astype(np.int32)
    frames[:, :, 20] = -1  # a gap column, in every frame
    frames[4, 10, 10] = -2  # a dead pixel in one frame
    frames[6] = 0  # an empty frame
    path = tmp_path / "scan.nxs"
    _write_scan(path, frames)
    return path, frames


def _count_file_reads(scan, monkeypatch) -> list[tuple[int, int]]:
    reads: list[tuple[int, int]] = []
    source = scan._frames()
    original = source.read

    def counting(start: int, stop: int) -> np.ndarray:
        reads.append((start, stop))
        return original(start, stop)

    monkeypatch.setattr(source, "read", counting)
    return reads


def test_a_scan_keeping_its_frames_reads_each_from_the_file_once(scan_file, monkeypatch):
    path, stored = scan_file
    with open_scan(path) as plain, open_scan(path, cache_bytes=1 << 20) as kept:
        reads = _count_file_reads(kept, monkeypatch)
        for _ in range(2):  # the prediction's pass, then the peak table's
            for a, b in zip(plain.iter_frames(batch=4), kept.iter_frames(batch=4)):
                np.testing.assert_array_equal(a.frames, b.frames)
                np.testing.assert_array_equal(a.bad_pixels, b.bad_pixels)
        first_pass = list(reads)
        assert first_pass == [(0, 4), (4, 8), (8, 9)]
        # every other way of reading is served from memory, identically
        np.testing.assert_array_equal(kept.read_raw(2, 7), stored[2:7])
        np.testing.assert_array_equal(kept[5], plain[5])
        np.testing.assert_array_equal(kept[1:8:3], plain[1:8:3])
        for a, b in zip(kept.read_frames([8, 0, 3]), plain.read_frames([8, 0, 3])):
            np.testing.assert_array_equal(a, b)
        assert reads == first_pass
        with pytest.warns(BadPixelWarning, match="all zero"):
            kept.check_frames()
        with pytest.warns(BadPixelWarning, match="all zero"):
            plain.check_frames()
        assert [str(w) for w in kept.warnings] == [str(w) for w in plain.warnings]
        assert any("all zero" in str(w) for w in kept.warnings)


def test_the_cache_keeps_the_first_frames_that_fit_and_close_frees_them(scan_file, monkeypatch):
    path, stored = scan_file
    one_frame = _pack_frame(stored[0]).nbytes
    scan = open_scan(path, cache_bytes=int(3.5 * one_frame))
    with scan:
        reads = _count_file_reads(scan, monkeypatch)
        scan.read_raw()
        assert sorted(scan._kept.frames) == [0, 1, 2] and scan._kept.used <= scan.cache_bytes
        scan.read_raw(0, 3)
        assert reads == [(0, 9)]  # frames 0..2 from memory
        np.testing.assert_array_equal(scan.read_raw(2, 5), stored[2:5])  # partly kept: from the file
        assert reads == [(0, 9), (2, 5)]
    assert scan._kept.frames == {}
    with open_scan(path) as plain:  # no budget: nothing kept
        plain.read_raw()
        assert plain._kept.frames == {}


def test_a_pickled_scan_keeps_its_budget_not_its_frames(scan_file):
    path, stored = scan_file
    with open_scan(path, cache_bytes=1 << 20) as scan:
        scan.read_raw()
        copy = pickle.loads(pickle.dumps(scan))
    assert copy.cache_bytes == 1 << 20 and copy._kept.frames == {}
    with copy:
        np.testing.assert_array_equal(copy.read_raw(), stored)
        assert sorted(copy._kept.frames) == list(range(len(stored)))
