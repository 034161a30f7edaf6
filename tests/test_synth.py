"""Tests of the scan simulator (dipid.synth): ground truth, statistics, files, determinism."""

from __future__ import annotations

import dataclasses
import math

import h5py
import numpy as np
import pytest

from dipid.errors import UnknownNameError
from dipid.io.coco import encode_masks, read_coco
from dipid.synth import (
    DETECTORS,
    PRESETS,
    scan_seed,
    simulate_dataset,
    simulate_scan,
)
from dipid.synth.rle import window_rle

# Statistics of the 1251 real I16 peak polygons (tests/data/README.md).
REAL_AREA_QUARTILES = (170.0, 770.0, 2430.0)
REAL_CENTROID_MEDIAN_ROW, REAL_CENTROID_MEDIAN_COL = 101.0, 269.0

N_STAT_SCANS = 24


@pytest.fixture(scope="module")
def realistic_scans():
    """A few hundred reflections' worth of realistic 61-frame Pilatus scans (~10 s)."""
    return [simulate_scan(seed=seed) for seed in range(N_STAT_SCANS)]


def _instances(scans):
    """(scan index, frame, reflection id, mask) of every labelled instance."""
    for k, scan in enumerate(scans):
        for fl in scan.labels:
            for rid, mask in zip(fl.reflection_ids, fl.masks()):
                yield k, fl.frame, int(rid), mask


# --------------------------------------------------------------------------- ground truth


def test_frames_and_labels_have_the_pilatus_shape(realistic_scans):
    for scan in realistic_scans[:4]:
        assert scan.frames.shape == (61, 195, 487) and scan.frames.dtype == np.int32
        assert [fl.frame for fl in scan.labels] == list(range(61))
        for fl in scan.labels:
            assert (fl.height, fl.width) == (195, 487)
            boxes = fl.boxes_xyxy()
            assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= 487) and np.all(boxes[:, 3] <= 195)
            assert np.all(fl.areas() >= 1)
            assert len(set(fl.reflection_ids.tolist())) == len(fl)  # one instance per reflection
            assert np.all((fl.reflection_ids >= 0) & (fl.reflection_ids < len(scan.reflections)))
            masks = scan.truth_masks(fl.frame)
            assert masks.shape == (len(fl), 195, 487) and masks.dtype == bool


def test_masks_sit_on_the_counts_they_label(realistic_scans):
    """Inside a mask the peak adds at least about the visibility threshold to the background;
    a misplaced or transposed mask would sit on plain background."""
    checked = 0
    backgrounds = [scan.background for scan in realistic_scans[:6]]
    for k, f, rid, mask in _instances(realistic_scans[:6]):
        if mask.sum() < 50:
            continue
        scan = realistic_scans[k]
        raw = scan.frames[f]
        good = mask & (raw >= 0) & (raw < scan.saturation_value)
        good[scan.defects.hot_rows, scan.defects.hot_cols] = False
        background = backgrounds[k][f]
        excess = raw[good].astype(np.float64) - background[good]
        threshold = 2.0 * np.sqrt(np.maximum(background[good], 1.0))
        assert excess.mean() >= 0.8 * threshold.mean(), (k, f, rid)
        checked += 1
    assert checked > 50


def test_reflection_ids_are_consistent_across_frames(realistic_scans):
    runs: dict[tuple[int, int], list[int]] = {}
    centroids: dict[tuple[int, int], dict[int, tuple[float, float, bool]]] = {}
    for k, f, rid, mask in _instances(realistic_scans):
        runs.setdefault((k, rid), []).append(f)
        rows, cols = np.nonzero(mask)
        at_edge = rows.min() == 0 or cols.min() == 0 or rows.max() == 194 or cols.max() == 486
        centroids.setdefault((k, rid), {})[f] = (rows.mean(), cols.mean(), at_edge)
    moves = []
    for (k, rid), frames in runs.items():
        transmission = realistic_scans[k].attenuator_transmission
        missing = sorted(set(range(frames[0], frames[-1] + 1)) - set(frames))
        # A reflection can only vanish mid-run where the attenuator cut the beam.
        for f in missing:
            assert transmission[f] < max(transmission[frames[0]], transmission[frames[-1]]), (k, rid, f)
        if realistic_scans[k].reflections[rid].kind == "split":
            continue  # mosaic blocks rock at different angles: the union may jump when one appears
        per_frame = centroids[(k, rid)]
        for f in frames:
            if f + 1 in per_frame and not (per_frame[f][2] or per_frame[f + 1][2]):
                moves.append(math.hypot(per_frame[f][0] - per_frame[f + 1][0], per_frame[f][1] - per_frame[f + 1][1]))
    assert len(runs) > 60
    assert max(moves) <= 10.0
    assert np.median(moves) <= 1.5


def test_truth_volume_matches_the_masks(realistic_scans):
    scan = realistic_scans[1]
    volume = scan.truth_volume()
    assert volume.shape == scan.frames.shape and volume.dtype == np.int32
    for fl in scan.labels:
        masks = fl.masks()
        union = masks.any(axis=0) if len(fl) else np.zeros((195, 487), bool)
        assert np.array_equal(volume[fl.frame] > 0, union)
        labelled = volume[fl.frame][union] - 1
        owner_mask = {int(rid): m for rid, m in zip(fl.reflection_ids, masks)}
        assert set(np.unique(labelled).tolist()) <= set(owner_mask)
        for rid, m in owner_mask.items():  # every pixel's owner covers it
            assert np.all(m[volume[fl.frame] == rid + 1])


# --------------------------------------------------------------------------- statistics


def test_ground_truth_statistics_match_the_real_i16_labels(realistic_scans):
    areas, rows, cols, per_frame = [], [], [], []
    for scan in realistic_scans:
        counts = [len(fl) for fl in scan.labels]
        assert counts[0] == 0 and counts[-1] == 0  # the scan ends are empty
        for fl in scan.labels:
            if not len(fl):
                continue
            per_frame.append(len(fl))
            areas.extend(fl.areas().tolist())
            for mask in fl.masks():
                r, c = np.nonzero(mask)
                rows.append(r.mean())
                cols.append(c.mean())
    areas = np.asarray(areas, dtype=np.float64)
    assert len(areas) > 300
    q1, median, q3 = np.percentile(areas, [25, 50, 75])
    assert 100 <= q1 <= 260, q1
    assert 550 <= median <= 1100, median
    assert 1700 <= q3 <= 3500, q3
    assert 0.05 <= np.mean(areas < 50) <= 0.25
    assert 1 <= min(per_frame) and max(per_frame) <= 8
    assert 1.3 <= np.mean(per_frame) <= 3.0  # real frames: 1.9 peaks on average
    assert abs(np.median(rows) - REAL_CENTROID_MEDIAN_ROW) <= 20
    assert abs(np.median(cols) - REAL_CENTROID_MEDIAN_COL) <= 35


def test_shape_kinds_and_very_large_instances_occur(realistic_scans):
    kinds = {r.kind for scan in realistic_scans for r in scan.reflections}
    assert kinds == {"round", "elliptical", "streak", "split", "irregular"}
    widest = max(float((fl.boxes_xyxy()[:, 2] - fl.boxes_xyxy()[:, 0]).max())
                 for scan in realistic_scans for fl in scan.labels if len(fl))
    assert widest >= 240  # some peaks (rods) span half the detector or more


def test_defects_saturation_and_attenuation(realistic_scans):
    sat = realistic_scans[0].saturation_value
    assert sat == 1e6
    assert all(scan.frames.max() <= sat for scan in realistic_scans)
    assert any((scan.frames == -2).any() for scan in realistic_scans)
    assert any((scan.frames == sat).any() for scan in realistic_scans)
    assert not any((scan.frames == -1).any() for scan in realistic_scans)  # Pilatus 100K: one module, no gaps
    hot = [scan.frames[:, scan.defects.hot_rows, scan.defects.hot_cols] for scan in realistic_scans]
    assert any(h.size for h in hot) and all(h.min() > 500 for h in hot if h.size)  # hot pixels read huge
    for scan in realistic_scans[:3]:
        bad = scan.bad_pixels
        assert np.array_equal(bad & (scan.frames < 0), scan.frames < 0) and bad[scan.frames == sat].all()
    changing = [scan for scan in realistic_scans if np.ptp(scan.attenuator_transmission) > 0]
    assert changing, "no scan with attenuator changes"
    for scan in realistic_scans:
        assert np.all((scan.attenuator_transmission > 0) & (scan.attenuator_transmission <= 1))
    # The recorded transmission is the one applied: compare the summed background of the least and
    # most attenuated frames of the brightest-background scan with changes.
    scan = max(changing, key=lambda s: float(np.median(s.background_image)))
    low, high = int(np.argmin(scan.attenuator_transmission)), int(np.argmax(scan.attenuator_transmission))
    volume = scan.truth_volume()
    quiet = (volume[low] == 0) & (volume[high] == 0) & (scan.frames[low] >= 0) & (scan.frames[low] < 1e4)
    quiet &= (scan.frames[high] >= 0) & (scan.frames[high] < 1e4)
    observed = scan.frames[low][quiet].sum() / max(scan.frames[high][quiet].sum(), 1)
    expected = scan.attenuator_transmission[low] / scan.attenuator_transmission[high]
    assert observed == pytest.approx(expected, rel=0.15, abs=3.0 / max(scan.frames[high][quiet].sum(), 1))


def test_presets_differ_in_difficulty():
    easy = [simulate_scan(preset="easy", n_frames=31, seed=s) for s in range(3)]
    hard = [simulate_scan(preset="hard", n_frames=31, seed=s) for s in range(3)]
    for scan in easy:
        assert {r.kind for r in scan.reflections} <= {"round", "elliptical"}
        centres = [(r.centre_row, r.centre_col) for r in scan.reflections]
        for i in range(len(centres)):
            for j in range(i):
                assert math.dist(centres[i], centres[j]) > 70.0
    hard_peaks = np.median([r.peak_counts for s in hard for r in s.reflections])
    easy_peaks = np.median([r.peak_counts for s in easy for r in s.reflections])
    assert hard_peaks * 10 < easy_peaks
    def mean_background(scans):
        return np.mean([np.median(s.background_image) for s in scans])

    assert mean_background(hard) > mean_background(easy)
    assert sum((s.frames == -2).sum() for s in hard) > sum((s.frames == -2).sum() for s in easy)


# --------------------------------------------------------------------------- files


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path):
    a = simulate_scan(n_frames=9, seed=7)
    b = simulate_scan(n_frames=9, seed=7)
    c = simulate_scan(n_frames=9, seed=8)
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)
    files_a = a.write(tmp_path / "a", "scan")
    files_b = b.write(tmp_path / "b", "scan")
    files_c = c.write(tmp_path / "c", "scan")
    assert files_a.nexus.read_bytes() == files_b.nexus.read_bytes()
    assert files_a.labels.read_bytes() == files_b.labels.read_bytes()
    assert files_a.nexus.read_bytes() != files_c.nexus.read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))  # atomic writes leave no temporaries


def test_written_nexus_has_the_i16_layout(tmp_path):
    scan = simulate_scan(n_frames=8, seed=11)
    files = scan.write(tmp_path, "sim_011")
    assert files.nexus == tmp_path / "sim_011.nxs" and files.labels == tmp_path / "sim_011_labels.json"
    with h5py.File(files.nexus, "r") as f:
        assert f.attrs["default"] in (b"entry", "entry")
        entry = f["entry"]
        assert entry.attrs["NX_class"] == b"NXentry" and entry.attrs["default"] == b"pil3_100k"
        det = f["entry/instrument/pil3_100k"]
        assert det.attrs["NX_class"] == b"NXdetector"
        data = det["data"]
        assert data.dtype == np.int32 and data.shape == (8, 195, 487) and data.chunks == (1, 195, 487)
        assert data.compression == "gzip"
        assert np.array_equal(data[()], scan.frames)
        assert float(np.asarray(det["saturation_value"][()])) == 1e6
        assert det["count_time"].shape == (8,)
        assert det["sensor_material"][()] in (b"Silicon", "Silicon")
        transmission = f["entry/instrument/attenuator/attenuator_transmission"][()]
        assert np.array_equal(transmission, scan.attenuator_transmission)
        command = f["entry/diamond_scan/scan_command"][()]
        assert (command.decode() if isinstance(command, bytes) else command).startswith("scan eta ")
        energy = f["entry/sample/beam/incident_energy"]
        assert energy.attrs["units"] == b"keV" and float(energy[()]) == pytest.approx(9.0)
        nxdata = f["entry/pil3_100k"]
        assert nxdata.attrs["NX_class"] == b"NXdata" and nxdata.attrs["signal"] == b"data"
        assert [a.decode() for a in nxdata.attrs["axes"]] == ["eta", ".", "."]
        assert isinstance(nxdata.get("data", getlink=True), h5py.HardLink)
        assert nxdata["data"] == data  # the same HDF5 object
        assert nxdata["eta"].attrs["units"] == b"deg"
        assert np.allclose(nxdata["eta"][()], scan.axis_values)
        assert np.all(np.diff(nxdata["eta"][()]) > 0)


def test_written_labels_read_back_with_the_same_masks(tmp_path):
    scan = simulate_scan(n_frames=12, seed=4)
    files = scan.write(tmp_path, "s4")
    label_set = read_coco(files.labels)
    assert len(label_set) == 12  # empty frames are listed too
    assert {fl.scan for fl in label_set} == {"s4.nxs"}
    assert label_set.scan_path("s4.nxs") == files.nexus
    for fl in label_set:
        assert np.array_equal(fl.masks(), scan.truth_masks(fl.frame))
        assert np.array_equal(fl.reflection_ids, scan.labels[fl.frame].reflection_ids)
    assert label_set.n_instances == sum(len(fl) for fl in scan.labels) > 0


def test_simulate_dataset_derives_one_seed_per_scan(tmp_path):
    files = simulate_dataset(tmp_path, n_scans=2, n_frames=5, seed=3, progress=False)
    assert [f.nexus.name for f in files] == ["sim_00000.nxs", "sim_00001.nxs"]
    assert all(f.labels.is_file() for f in files)
    assert scan_seed(3, 0) != scan_seed(3, 1) != scan_seed(4, 1)
    again = simulate_scan(n_frames=5, seed=scan_seed(3, 1))
    with h5py.File(files[1].nexus, "r") as f:
        assert np.array_equal(f["entry/instrument/pil3_100k/data"][()], again.frames)


def test_window_rle_matches_full_frame_encoding():
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 25, 2))
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        row0, col0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        window = rng.random((h, w)) < rng.random()
        full = np.zeros((1, height, width), bool)
        full[0, row0:row0 + h, col0:col0 + w] = window
        assert window_rle(window, row0, col0, height, width) == {**encode_masks(full)[0], "size": [height, width]}


# --------------------------------------------------------------------------- names and Eiger


def test_unknown_preset_or_detector_lists_valid_names():
    with pytest.raises(UnknownNameError, match="easy, hard, realistic"):
        simulate_scan(preset="medium")
    with pytest.raises(UnknownNameError, match="eiger4m, pilatus100k"):
        simulate_scan(detector="pilatus1m")
    with pytest.raises(ValueError):
        simulate_scan(n_frames=0)
    assert set(PRESETS) == {"easy", "realistic", "hard", "broad"} and set(DETECTORS) == {"pilatus100k", "eiger4m"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["easy"].max_per_frame = 3  # type: ignore[misc]


def _ring_radius_measured(scan) -> float:
    """Radius (px) of the maximum of the background's radial profile around the beam centre."""
    g = scan.geometry
    rows, cols = np.indices(scan.background_image.shape)
    radius = np.hypot(rows - g.beam_row, cols - g.beam_col).astype(np.int64)
    pixels = np.bincount(radius.ravel())
    profile = np.bincount(radius.ravel(), weights=scan.background_image.ravel()) / np.maximum(pixels, 1)
    usable = pixels > 50
    start = 200  # skip the air-scatter rise near the beam
    return float(start + np.argmax(np.where(usable, profile, 0)[start:]))


def _expected_ring_radius(energy_kev: float, camera_length_mm: float, q: float = 2.0) -> float:
    wavelength = 12.398 / energy_kev
    two_theta = 2 * math.asin(q * wavelength / (4 * math.pi))
    return camera_length_mm * math.tan(two_theta) / 0.075


def test_eiger4m_frames_gaps_spots_and_water_ring():
    base = simulate_scan(detector="eiger4m", n_frames=1, seed=0)
    assert base.frames.shape == (1, 2162, 2068)
    gap = base.frames[0] == -1
    assert gap[512:550].all() and gap[:, 1028:1040].all() and not gap[:512, :1028].any()
    spots = base.labels[0]
    assert 10 <= len(spots) <= 1000
    assert np.median(spots.areas()) < 80  # a few pixels each
    measured = _ring_radius_measured(base)
    assert measured == pytest.approx(_expected_ring_radius(12.4, 200.0), rel=0.04)
    farther = simulate_scan(detector="eiger4m", n_frames=1, seed=0, camera_length_mm=250.0)
    harder_x_rays = simulate_scan(detector="eiger4m", n_frames=1, seed=0, energy_kev=16.0)
    assert _ring_radius_measured(farther) == pytest.approx(_expected_ring_radius(12.4, 250.0), rel=0.04)
    assert _ring_radius_measured(harder_x_rays) == pytest.approx(_expected_ring_radius(16.0, 200.0), rel=0.04)
    assert _ring_radius_measured(farther) > measured > _ring_radius_measured(harder_x_rays)
