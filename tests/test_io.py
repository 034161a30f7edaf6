"""dipid.io scan reading: real I16 fixtures, generated link targets, TIFF lists, errors."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from dipid.errors import (
    CorruptFileError,
    DetectorDataNotFoundError,
    EmptyScanError,
    FrameIndexError,
    LinkTargetMissingError,
    MaskFileError,
    NotHDF5Error,
    PartialScanWarning,
    ScanError,
    ScanFileNotFoundError,
    ScanShapeError,
)
from dipid.io import FrameBatch, Scan, ScanAxis, ScanMetadata, fill_bad_pixels, open_scan
from dipid.io import scan as scan_module
from dipid.io.pixels import bad_pixels, clear_fill_cache, nearest_good_pixel_map

H, W = 195, 487
SATURATION = 1_000_000
NEW_SCAN, OLD_SCAN = "1040323", "1049598"
N_FRAMES = {NEW_SCAN: 21, OLD_SCAN: 101}


@pytest.fixture(scope="module")
def i16_dir(fixtures_dir: Path) -> Path:
    path = fixtures_dir / "i16"
    assert (path / f"{NEW_SCAN}.nxs").is_file(), f"I16 fixtures missing under {path}"
    return path


# --------------------------------------------------------------------------- helpers


def make_frames(n: int, *, seed: int = 0) -> np.ndarray:
    """(n, H, W) int32 Pilatus-like counts with gap/dead pixels and one saturated pixel."""
    rng = np.random.default_rng(seed)
    base = rng.poisson(20, size=(H, W)).astype(np.int32)
    frames = base[None] + (np.arange(n, dtype=np.int32) * 100)[:, None, None]  # frames differ from each other
    frames[:, :, 61] += np.arange(n, dtype=np.int32)[:, None] % 7  # and not only by an offset
    frames[:, :, 60] = -1  # a gap column, in every frame
    frames[:, 100:103, 200:204] = -2  # a dead cluster
    frames[:, 10, 10] = -2  # an isolated dead pixel
    frames[min(2, n - 1), 150, 300] = SATURATION + 5  # a saturated pixel in one frame
    if n > 3:
        frames[3, 40, 400] = -2  # a pixel that dies after the first frame
    return frames


def write_detector_hdf(path: Path, frames: np.ndarray) -> None:
    """The Pilatus writer's file: /entry/instrument/detector/data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/instrument/detector/data", data=frames, chunks=(1, H, W))


def copy_fixture(i16_dir: Path, scan_id: str, tmp_path: Path) -> Path:
    dest = tmp_path / f"{scan_id}.nxs"
    shutil.copyfile(i16_dir / f"{scan_id}.nxs", dest)
    dest.chmod(0o644)
    return dest


def assert_nearest_good_fill(raw: np.ndarray, filled: np.ndarray, fill_mask: np.ndarray) -> None:
    """Each filled pixel holds the value of one of the good pixels nearest to it (brute force)."""
    radius = 8  # search a window first; valid when the nearest good pixel is within it
    for r, c in zip(*np.nonzero(fill_mask)):
        r0, c0 = max(r - radius, 0), max(c - radius, 0)
        window = ~fill_mask[r0 : r + radius + 1, c0 : c + radius + 1]
        good_r, good_c = np.nonzero(window)
        good_r, good_c = good_r + r0, good_c + c0
        d2 = (good_r - r) ** 2 + (good_c - c) ** 2
        if d2.size == 0 or d2.min() > radius**2:
            good_r, good_c = np.nonzero(~fill_mask)
            d2 = (good_r - r) ** 2 + (good_c - c) ** 2
        nearest = d2 == d2.min()
        allowed = set(raw[good_r[nearest], good_c[nearest]].astype(np.float32).tolist())
        assert float(filled[r, c]) in allowed, (r, c, filled[r, c], allowed)


# --------------------------------------------------------------------------- real fixtures


def test_new_layout_axis_and_metadata(i16_dir: Path):
    with open_scan(i16_dir / f"{NEW_SCAN}.nxs") as scan:
        assert scan.detector == "pil3_100k"
        assert scan.data_path == "/entry/instrument/pil3_100k/data"
        axis = scan.axis
        assert isinstance(axis, ScanAxis)
        assert axis.name == "hkl_l"
        assert axis.values.dtype == np.float64 and axis.values.shape == (21,)
        # the scan command asks for l from 0.1118 to 0.1318 in steps of 0.001
        assert axis.values[0] == pytest.approx(0.11179, abs=1e-4)
        assert np.allclose(np.diff(axis.values), 0.001, atol=1e-6)
        meta = scan.metadata
        assert isinstance(meta, ScanMetadata)
        assert meta.scan_command.startswith("scan hkl") and "pil3_100k" in meta.scan_command
        assert meta.detector == "pil3_100k"
        assert meta.saturation_value == 1e6
        assert meta.energy_kev == pytest.approx(9.0, abs=1e-3)
        assert meta.attenuator_transmission == 1.0
        assert np.asarray(meta.count_time_s).shape == (21,)
        assert meta.start_time.startswith("2024-02-27")
        as_dict = meta.to_dict()
        assert as_dict["energy_kev"] == meta.energy_kev and isinstance(as_dict["count_time_s"], list)


def test_old_layout_axis_and_metadata(i16_dir: Path):
    with open_scan(i16_dir / f"{OLD_SCAN}.nxs") as scan:
        assert scan.detector == "pil3_100k"
        axis = scan.axis
        assert axis.name == "h"
        assert axis.values.shape == (101,)
        assert axis.values[0] == pytest.approx(-0.05, abs=1e-6)
        assert axis.values[-1] == pytest.approx(0.05, abs=1e-6)
        meta = scan.metadata
        assert meta.scan_command.startswith("scan hkl") and "roi1" in meta.scan_command
        assert meta.saturation_value == 1e6
        assert meta.energy_kev == pytest.approx(3.58, abs=1e-3)
        assert meta.start_time.startswith("2024-05-17")


@pytest.mark.parametrize("scan_id", [NEW_SCAN, OLD_SCAN])
def test_missing_link_target_error(i16_dir: Path, scan_id: str):
    scan = open_scan(i16_dir / f"{scan_id}.nxs")
    assert not scan.frames_available
    expected = (i16_dir / f"{scan_id}-pilatus3_100k-files" / f"{scan_id}.hdf").resolve()
    for access in (lambda: scan[0], lambda: len(scan), lambda: scan.read_raw(0, 1), scan.require_frames):
        with pytest.raises(LinkTargetMissingError) as info:
            access()
        message = str(info.value)
        assert str(expected) in message
        assert "/pil3_100k/data" in message and info.value.path_in_file.endswith("/pil3_100k/data")
        assert info.value.file == i16_dir / f"{scan_id}.nxs"
    if scan_id == OLD_SCAN:  # the TIFF alternative is named too
        assert "00001.tif" in message
    scan.close()


# --------------------------------------------------------------------------- frames through the link


@pytest.fixture(scope="module")
def linked_scans(i16_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    out = {}
    for scan_id in (NEW_SCAN, OLD_SCAN):
        folder = tmp_path_factory.mktemp(f"linked_{scan_id}")
        nexus = copy_fixture(i16_dir, scan_id, folder)
        frames = make_frames(N_FRAMES[scan_id], seed=int(scan_id) % 97)
        write_detector_hdf(folder / f"{scan_id}-pilatus3_100k-files" / f"{scan_id}.hdf", frames)
        out[scan_id] = (nexus, frames)
    return out


@pytest.mark.parametrize("scan_id", [NEW_SCAN, OLD_SCAN])
def test_frames_through_external_link(linked_scans, scan_id: str):
    nexus, written = linked_scans[scan_id]
    with open_scan(nexus) as scan:
        n = N_FRAMES[scan_id]
        assert len(scan) == n and scan.shape == (n, H, W) and scan.frame_shape == (H, W)
        assert scan.axis.values.shape == (n,)
        raw = scan.read_raw(0, n)
        assert raw.dtype == np.int32
        np.testing.assert_array_equal(raw, written)
        np.testing.assert_array_equal(scan.read_raw(-3), written[-3:])

        static = scan.bad_pixel_mask
        assert static.shape == (H, W) and static.dtype == bool
        np.testing.assert_array_equal(static, written[0] < 0)
        assert static[:, 60].all() and static[100:103, 200:204].all() and static[10, 10]
        assert not static[40, 400]  # dies only in frame 3

        for i in (0, 3, n - 1):
            frame = scan[i]
            assert frame.dtype == np.float32 and frame.shape == (H, W)
            unmeasured = written[i] < 0
            np.testing.assert_array_equal(frame[~unmeasured], written[i][~unmeasured].astype(np.float32))
            assert (frame >= 0).all()
            assert_nearest_good_fill(written[i], frame, unmeasured)
        np.testing.assert_array_equal(scan[-1], scan[n - 1])


def test_iter_frames_batches_and_bad_pixels(linked_scans):
    nexus, written = linked_scans[NEW_SCAN]
    with open_scan(nexus) as scan:
        batches = list(scan.iter_frames(start=1, stop=20, batch=8))
        assert [b.start for b in batches] == [1, 9, 17]
        assert [len(b) for b in batches] == [8, 8, 3]
        assert all(isinstance(b, FrameBatch) for b in batches)
        np.testing.assert_array_equal(np.concatenate([b.indices for b in batches]), np.arange(1, 20))
        frames = np.concatenate([b.frames for b in batches])
        bad = np.concatenate([b.bad_pixels for b in batches])
        assert frames.dtype == np.float32 and bad.dtype == bool
        for k, i in enumerate(range(1, 20)):
            np.testing.assert_array_equal(frames[k], scan[i])
        expected_bad = (written[1:20] < 0) | (written[1:20] >= SATURATION) | scan.bad_pixel_mask
        np.testing.assert_array_equal(bad, expected_bad)
        # the saturated pixel (frame 2) is flagged and, by default, filled from its neighbours
        assert bad[1, 150, 300] and frames[1, 150, 300] < SATURATION
        assert bad[2, 40, 400] and not bad[0, 40, 400]  # transient dead pixel of frame 3


def test_fill_saturated_option(linked_scans):
    nexus, written = linked_scans[NEW_SCAN]
    with open_scan(nexus) as scan:
        frame = scan[2]
        assert frame[150, 300] < SATURATION
        fill_mask = (written[2] < 0) | (written[2] >= SATURATION)
        assert_nearest_good_fill(written[2], frame, fill_mask)
    with open_scan(nexus, fill_saturated=False) as scan:
        assert scan[2][150, 300] == SATURATION + 5


def test_one_slice_per_batch_and_files_stay_open(linked_scans, monkeypatch):
    nexus, _ = linked_scans[NEW_SCAN]
    reads: list[tuple[int, int]] = []
    original = scan_module._HDF5Frames.read

    def counting(self, start, stop):
        reads.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(scan_module._HDF5Frames, "read", counting)
    opened = []
    real_open = scan_module.open_h5
    monkeypatch.setattr(scan_module, "open_h5", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    with open_scan(nexus) as scan:
        _ = scan.bad_pixel_mask  # one read of frame 0
        reads.clear()
        list(scan.iter_frames(batch=5))
        assert reads == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 21)]
        for i in range(4):
            scan[i]
        assert len(opened) == 1  # the NeXus file is not reopened per frame


def test_huge_scan_is_never_read_whole(tmp_path: Path, monkeypatch):
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:  # unwritten chunks: a 10 000-frame scan that costs no disk
        ds = f.create_dataset("entry/instrument/pil3_100k/data", shape=(10_000, H, W), dtype=np.int32,
                              chunks=(1, H, W), fillvalue=7)
        ds[9_999] = 9
    sizes: list[int] = []
    original = scan_module._HDF5Frames.read
    monkeypatch.setattr(scan_module._HDF5Frames, "read",
                        lambda self, a, b: sizes.append(b - a) or original(self, a, b))
    with pytest.warns(PartialScanWarning, match="only 1 of the 10000 declared frames were written"):
        scan = open_scan(path)  # the last frame is written: all 10 000 are kept, the others read as fill
    with scan:
        assert len(scan) == 10_000
        assert scan[-1][0, 0] == 9 and scan[5_000][0, 0] == 7
        assert scan.axis.name == "frame" and scan.axis.values[-1] == 9_999
        for batch in scan.iter_frames(start=100, stop=140, batch=16):
            assert batch.frames.shape[0] <= 16
    assert max(sizes) <= 16


def test_scan_pickles_without_h5py_objects(linked_scans):
    nexus, written = linked_scans[OLD_SCAN]
    scan = open_scan(nexus)
    expected = scan[5]
    data = pickle.dumps(scan)
    scan.close()
    clone = pickle.loads(data)
    assert isinstance(clone, Scan) and clone._files is None  # reopens lazily
    np.testing.assert_array_equal(clone[5], expected)
    np.testing.assert_array_equal(clone.read_raw(5, 6)[0], written[5])
    assert clone.axis.name == "h" and clone.data_path == scan.data_path
    clone.close()


def test_absolute_beamline_link_is_found_next_to_scan(tmp_path: Path):
    frames = make_frames(4)
    write_detector_hdf(tmp_path / "77-pilatus3_100k-files" / "77.hdf", frames)
    with h5py.File(tmp_path / "77.nxs", "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        det = entry.create_group("instrument/pil3_100k")
        det.attrs["NX_class"] = "NXdetector"
        det["data"] = h5py.ExternalLink("/dls/i16/data/2099/cm1-1/77-pilatus3_100k-files/77.hdf",
                                        "/entry/instrument/detector/data")
    with open_scan(tmp_path / "77.nxs") as scan:
        np.testing.assert_array_equal(scan.read_raw(), frames)


# --------------------------------------------------------------------------- TIFF list layout


def test_tiff_list_layout(i16_dir: Path, tmp_path: Path):
    nexus = copy_fixture(i16_dir, OLD_SCAN, tmp_path)
    with h5py.File(nexus, "r") as f:
        names = [n.decode() for n in f["entry1/instrument/pil3_100k/image_data"][()]]
    rng = np.random.default_rng(3)
    small = rng.poisson(5, size=(len(names), 12, 20)).astype(np.int32)  # small frames keep the test fast
    small[:, 4, 7] = -2
    small[50, 0, 0] = -1
    for frame, name in zip(small, names):
        target = tmp_path / name
        target.parent.mkdir(exist_ok=True)
        tifffile.imwrite(target, frame)
    assert not (tmp_path / f"{OLD_SCAN}-pilatus3_100k-files" / f"{OLD_SCAN}.hdf").exists()

    with open_scan(nexus) as scan:
        assert scan.data_path == "/entry1/instrument/pil3_100k/image_data"
        assert scan.shape == (101, 12, 20)
        np.testing.assert_array_equal(scan.read_raw(48, 53), small[48:53])
        frame = scan[50]
        assert scan.bad_pixel_mask[4, 7] and not scan.bad_pixel_mask[0, 0]
        assert_nearest_good_fill(small[50], frame, small[50] < 0)
        assert scan.axis.name == "h" and len(scan.axis.values) == 101
        got = np.concatenate([b.frames for b in scan.iter_frames(batch=32)])
        assert got.shape == (101, 12, 20)
        np.testing.assert_array_equal(got[7], scan[7])

    (tmp_path / names[30]).unlink()
    with open_scan(nexus) as scan:
        scan[29]
        with pytest.raises(LinkTargetMissingError, match="00031.tif"):
            scan[30]


def test_hdf5_preferred_over_tiffs_when_present(linked_scans):
    nexus, written = linked_scans[OLD_SCAN]
    with open_scan(nexus) as scan:
        assert scan.data_path in ("/entry1/instrument/pil3_100k/data", "/entry1/pil3_100k/data")
        np.testing.assert_array_equal(scan.read_raw(0, 2), written[:2])


# --------------------------------------------------------------------------- other layouts


def test_plain_hdf5_with_dataset(tmp_path: Path):
    path = tmp_path / "plain.h5"
    frames = make_frames(5)
    with h5py.File(path, "w") as f:
        f["frames/stack"] = frames
        f["other"] = np.zeros((3, 4, 5), np.float32)
    with open_scan(path, dataset="/frames/stack") as scan:
        assert scan.data_path == "/frames/stack"
        np.testing.assert_array_equal(scan.read_raw(), frames)
        assert scan.axis.name == "frame"
        np.testing.assert_array_equal(scan.axis.values, np.arange(5.0))
        assert scan.metadata.saturation_value is None  # not a Pilatus, nothing in the file
        np.testing.assert_array_equal(scan[1][scan.bad_pixel_mask], scan[1][scan.bad_pixel_mask])


def test_default_signal_layout_and_nxdata_axes(tmp_path: Path):
    path = tmp_path / "default.nxs"
    frames = make_frames(6)
    with h5py.File(path, "w") as f:
        f.attrs["default"] = "scan"
        entry = f.create_group("scan")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "plot"
        plot = entry.create_group("plot")
        plot.attrs.update({"NX_class": "NXdata", "signal": "counts", "axes": ["eta", ".", "."]})
        plot["counts"] = frames
        plot["eta"] = np.linspace(10, 11, 6)
    with open_scan(path) as scan:
        assert scan.data_path == "/scan/plot/counts"
        assert scan.axis.name == "eta"
        np.testing.assert_allclose(scan.axis.values, np.linspace(10, 11, 6))


def test_any_3d_dataset_and_detector_choice(tmp_path: Path):
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as f:
        for name, value in (("entry/instrument/merlin/data", 1), ("entry/instrument/pil2m/data", 2)):
            f[name] = np.full((3, 8, 9), value, np.int32)
        f["loose/cube"] = np.full((2, 4, 4), 5, np.uint16)
    with open_scan(path) as scan:
        assert scan.detector == "merlin"
    with open_scan(path, detector="pil2m") as scan:
        assert scan.detector == "pil2m" and scan[0][0, 0] == 2
    with pytest.raises(DetectorDataNotFoundError, match="merlin"):
        open_scan(path, detector="eiger9m")
    other = tmp_path / "loose.h5"
    with h5py.File(other, "w") as f:
        f["loose/cube"] = np.full((2, 4, 4), 5, np.uint16)
    with open_scan(other) as scan:
        assert scan.data_path == "/loose/cube" and scan.read_raw().dtype == np.uint16


# --------------------------------------------------------------------------- masks


def test_user_masks(tmp_path: Path):
    path = tmp_path / "plain.h5"
    frames = make_frames(3)
    with h5py.File(path, "w") as f:
        f["entry/instrument/pil3_100k/data"] = frames
    user = np.zeros((H, W), bool)
    user[5:7, 300:305] = True

    np.save(tmp_path / "mask.npy", user.astype(np.uint8))
    tifffile.imwrite(tmp_path / "mask.tif", user.astype(np.uint8))
    with h5py.File(tmp_path / "mask.nxs", "w") as f:
        f["entry/instrument/pil3_100k/pixel_mask"] = user.astype(np.uint32) * 4
        f["entry/instrument/pil3_100k/flatfield"] = np.ones((H, W), np.float32)
    for source in (tmp_path / "mask.npy", tmp_path / "mask.tif", tmp_path / "mask.nxs", user):
        with open_scan(path, mask=source) as scan:
            expected = user | (frames[0] < 0)
            np.testing.assert_array_equal(scan.bad_pixel_mask, expected)
            frame = scan[1]
            assert_nearest_good_fill(frames[1], frame, expected | (frames[1] < 0))

    np.save(tmp_path / "wrong.npy", np.zeros((W, H), bool))
    with pytest.raises(MaskFileError, match=r"\(487, 195\)"):
        open_scan(path, mask=tmp_path / "wrong.npy")
    (tmp_path / "junk.bin").write_bytes(b"not a mask at all")
    with pytest.raises(MaskFileError):
        open_scan(path, mask=tmp_path / "junk.bin")
    with pytest.raises(MaskFileError, match="not found"):
        open_scan(path, mask=tmp_path / "absent.npy")


# --------------------------------------------------------------------------- errors


def test_error_types(tmp_path: Path):
    with pytest.raises(ScanFileNotFoundError) as info:
        open_scan(tmp_path / "nope.nxs")
    assert "nope.nxs" in str(info.value)

    text = tmp_path / "notes.nxs"
    text.write_text("hello")
    with pytest.raises(NotHDF5Error, match="notes.nxs"):
        open_scan(text)
    with pytest.raises(NotHDF5Error):
        open_scan(tmp_path)

    good = tmp_path / "good.h5"
    with h5py.File(good, "w") as f:
        f.create_dataset("entry/instrument/pil3_100k/data", data=make_frames(4))
        f["entry/one_d"] = np.arange(5.0)
        f["entry/two_d"] = np.zeros((4, 5))
        f.create_dataset("entry/empty", shape=(0, H, W), dtype=np.int32)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="truncated.h5"):
        open_scan(truncated)

    nothing = tmp_path / "nothing.h5"
    with h5py.File(nothing, "w") as f:
        f["entry/rc"] = np.arange(5.0)
    with pytest.raises(DetectorDataNotFoundError, match="no 3D numeric dataset"):
        open_scan(nothing)
    with pytest.raises(DetectorDataNotFoundError) as info:
        open_scan(good, dataset="/entry/absent")
    assert info.value.path_in_file == "/entry/absent" and "/entry/instrument/pil3_100k/data" in str(info.value)

    for bad_dims in ("/entry/one_d", "/entry/two_d"):
        with pytest.raises(ScanShapeError, match="3D"):
            open_scan(good, dataset=bad_dims)
    with pytest.raises(EmptyScanError, match="0 frames"):
        open_scan(good, dataset="/entry/empty")

    with open_scan(good) as scan:
        for index in (4, -5, 100):
            with pytest.raises(FrameIndexError) as info:
                scan[index]
            assert "good.h5" in str(info.value) and "0..3" in str(info.value) and str(index) in str(info.value)
        assert isinstance(info.value, IndexError)
        with pytest.raises(FrameIndexError):
            scan.read_raw(2, 9)
        with pytest.raises(FrameIndexError):
            list(scan.iter_frames(3, 1))


def test_errors_are_dipid_errors_not_h5py(tmp_path: Path):
    """A dangling link inside a present target file and a broken dataset= link are ScanErrors."""
    write_detector_hdf(tmp_path / "x-files" / "x.hdf", make_frames(2))
    with h5py.File(tmp_path / "x.nxs", "w") as f:
        f["entry/instrument/pil3_100k/data"] = h5py.ExternalLink("x-files/x.hdf", "/entry/wrong/path")
    scan = open_scan(tmp_path / "x.nxs")
    with pytest.raises(LinkTargetMissingError, match="/entry/wrong/path"):
        scan[0]
    scan.close()
    with pytest.raises(ScanError):
        open_scan(tmp_path / "x.nxs", dataset="/entry/instrument/nothing/data")


# --------------------------------------------------------------------------- pixel maths


def test_fill_bad_pixels_nearest_good():
    rng = np.random.default_rng(1)
    frames = rng.normal(100, 10, size=(3, 30, 40)).astype(np.float64)
    bad = np.zeros((30, 40), bool)
    bad[:, 17] = True
    bad[5:9, 30:35] = True
    bad[0, 0] = True
    before = frames.copy()
    out = fill_bad_pixels(frames, bad)
    np.testing.assert_array_equal(frames, before)  # pure: input untouched
    assert out.dtype == np.float32 and out.shape == frames.shape
    for k in range(3):
        np.testing.assert_array_equal(out[k][~bad], frames[k][~bad].astype(np.float32))
        assert_nearest_good_fill(frames[k], out[k], bad)

    per_frame = np.zeros((3, 30, 40), bool)
    per_frame[1, 3, 3] = True
    per_frame[2] = bad
    out = fill_bad_pixels(frames, per_frame)
    np.testing.assert_array_equal(out[0], frames[0].astype(np.float32))
    assert_nearest_good_fill(frames[1], out[1], per_frame[1])
    assert_nearest_good_fill(frames[2], out[2], per_frame[2])

    assert (fill_bad_pixels(frames[0], np.ones((30, 40), bool)) == 0).all()


def test_fill_map_is_cached_and_fast():
    clear_fill_cache()
    bad = np.zeros((H, W), bool)
    bad[:, 60] = True
    bad[100:103, 200:204] = True
    first = nearest_good_pixel_map(bad)
    again = nearest_good_pixel_map(bad.copy())
    assert first[0] is again[0] and first[1] is again[1]  # memoised by content
    frame = np.random.default_rng(0).poisson(20, size=(H, W)).astype(np.int32)
    import time

    start = time.perf_counter()
    for _ in range(20):
        fill_bad_pixels(frame, bad)
    per_frame = (time.perf_counter() - start) / 20
    assert per_frame < 0.02, f"{per_frame * 1e3:.1f} ms per frame"  # ~0.3 ms expected; slack for busy CI


def test_bad_pixels_function():
    raw = np.array([[[0, -1, 5], [SATURATION, 3, 2]]], np.int32)
    static = np.array([[False, False, False], [False, False, True]])
    got = bad_pixels(raw, static_mask=static, saturation_value=SATURATION)
    np.testing.assert_array_equal(got, [[[False, True, False], [True, False, True]]])
    np.testing.assert_array_equal(bad_pixels(raw), raw < 0)
    floats = np.array([[np.nan, 1.0]], np.float32)
    np.testing.assert_array_equal(bad_pixels(floats), [[True, False]])


def test_read_frames_by_number(linked_scans):
    nexus, _ = linked_scans[NEW_SCAN]
    with open_scan(nexus) as scan:
        frames, bad = scan.read_frames([3, 4, 5])
        batch = next(scan.iter_frames(3, 6, 3))
        np.testing.assert_array_equal(frames, batch.frames)
        np.testing.assert_array_equal(bad, batch.bad_pixels)
        picked, _ = scan.read_frames([5, 1, -1])
        np.testing.assert_array_equal(picked[0], scan[5])
        np.testing.assert_array_equal(picked[1], scan[1])
        np.testing.assert_array_equal(picked[2], scan[len(scan) - 1])
        with pytest.raises(FrameIndexError, match="outside the scan"):
            scan.read_frames([0, len(scan)])
