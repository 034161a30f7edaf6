"""3D peaks: linking per-frame instances, measuring peaks, matching against truth."""

from __future__ import annotations

import numpy as np
import pytest

from dipid.errors import ScanError, ScanShapeError
from dipid.results import SOURCE_FLAGS, FrameStack, ImageResult, Instances, ScanResult
from dipid.volume import (
    PeakLinker,
    Peaks3D,
    link_peaks_3d,
    match_peaks_3d,
    peaks_table,
    read_counts,
    scan_peaks,
    stack_labels,
    stack_masks,
    to_dataframe,
    write_peaks_csv,
)

H, W = 24, 30


def _box_volume(n_frames: int, boxes: list[tuple[int, int, int, int, int, int]]) -> np.ndarray:
    """(F, H, W) bool with each (f0, f1, r0, r1, c0, c1) box (ends exclusive) set."""
    volume = np.zeros((n_frames, H, W), dtype=bool)
    for f0, f1, r0, r1, c0, c1 in boxes:
        volume[f0:f1, r0:r1, c0:c1] = True
    return volume


def _n_peaks(labels: np.ndarray) -> int:
    return len(np.unique(labels[labels > 0]))


# ------------------------------------------------------------------------------ stacking


def test_stack_masks_and_labels_paste_crops_back():
    masks = np.zeros((2, H, W), bool)
    masks[0, 2:5, 3:7] = True
    masks[1, 10:12, 20:29] = True
    inst = Instances.from_masks(masks, [0.9, 0.8], SOURCE_FLAGS["tlm"])
    empty = Instances.empty((H, W))
    union = stack_masks([inst, empty], (H, W))
    labels = stack_labels([inst, empty], (H, W))
    assert union.shape == labels.shape == (2, H, W)
    np.testing.assert_array_equal(union[0], masks.any(axis=0))
    assert not union[1].any()
    np.testing.assert_array_equal(labels[0][masks[0]], 1)
    np.testing.assert_array_equal(labels[0][masks[1]], 2)


def test_label_image_earlier_instance_wins_overlaps():
    masks = np.zeros((2, H, W), bool)
    masks[0, 0:3, 0:3] = True
    masks[1, 2:5, 2:5] = True  # overlaps instance 0 at (2, 2)
    found = Instances.from_masks(masks, [0.9, 0.8], SOURCE_FLAGS["tlm"])
    labels = stack_labels([found, Instances.empty((H, W))], (H, W))
    assert labels.dtype == np.int32
    assert labels[0, 2, 2] == 1 and labels[0, 0, 0] == 1 and labels[0, 4, 4] == 2 and labels[0, 8, 8] == 0
    assert np.count_nonzero(labels[0] == 2) == 8
    assert not labels[1].any()


# ------------------------------------------------------------------------------ linking


def test_link_joins_a_peak_over_frames_and_numbers_by_first_appearance():
    volume = _box_volume(8, [(3, 7, 2, 6, 2, 6), (0, 4, 15, 20, 20, 26)])
    labels = link_peaks_3d(volume)
    assert labels.dtype == np.int32 and labels.shape == volume.shape
    assert _n_peaks(labels) == 2
    np.testing.assert_array_equal(labels > 0, volume)
    # the peak starting in frame 0 is peak 1
    assert set(np.unique(labels[0:4, 15:20, 20:26])) == {1}
    assert set(np.unique(labels[3:7, 2:6, 2:6])) == {2}


def test_link_bridges_up_to_max_gap_missing_frames():
    one_gap = _box_volume(9, [(0, 3, 5, 9, 5, 9), (4, 7, 5, 9, 5, 9)])  # frame 3 missing
    two_gap = _box_volume(9, [(0, 3, 5, 9, 5, 9), (5, 8, 5, 9, 5, 9)])  # frames 3, 4 missing
    assert _n_peaks(link_peaks_3d(one_gap, max_gap=0)) == 2
    assert _n_peaks(link_peaks_3d(one_gap, max_gap=1)) == 1
    assert _n_peaks(link_peaks_3d(two_gap, max_gap=1)) == 2
    assert _n_peaks(link_peaks_3d(two_gap, max_gap=2)) == 1
    # bridging marks no new voxels
    np.testing.assert_array_equal(link_peaks_3d(one_gap, max_gap=1) > 0, one_gap)


def test_link_bridges_only_overlapping_footprints():
    # same frames as a bridged gap, but the second part sits elsewhere on the detector
    volume = _box_volume(9, [(0, 3, 5, 9, 5, 9), (4, 7, 5, 9, 10, 14)])
    assert _n_peaks(link_peaks_3d(volume, max_gap=3)) == 2


def test_link_keeps_diagonally_touching_peaks_apart_with_face_connectivity():
    volume = np.zeros((4, H, W), bool)
    volume[0:2, 4:7, 4:7] = True
    volume[2:4, 7:10, 7:10] = True  # touches the first only across a frame, corner to corner
    for rule in (0.0, 0.5):
        assert _n_peaks(link_peaks_3d(volume, connectivity=1, min_overlap=rule)) == 2
        assert _n_peaks(link_peaks_3d(volume, connectivity=2, min_overlap=rule)) == 2
    assert _n_peaks(link_peaks_3d(volume, connectivity=3, min_overlap=0.0)) == 1
    # one corner pixel of nine is too little contact under the default overlap rule
    assert _n_peaks(link_peaks_3d(volume, connectivity=3)) == 2
    # in-plane corner contact: apart with face connectivity, one peak with 8-neighbours
    plane = np.zeros((1, H, W), bool)
    plane[0, 2, 2] = plane[0, 3, 3] = True
    assert _n_peaks(link_peaks_3d(plane, connectivity=1)) == 2
    assert _n_peaks(link_peaks_3d(plane, connectivity=2)) == 1


def test_link_min_overlap_keeps_a_peak_appearing_at_the_edge_of_a_larger_one_apart():
    labels = np.zeros((4, H, W), np.int32)
    labels[:, 2:16, 2:22] = 1  # a large peak in every frame
    labels[2:4, 15:19, 10:14] = 2  # from frame 2 a small one covers a quarter of its old edge
    assert _n_peaks(link_peaks_3d(labels, min_overlap=0.0)) == 1
    peaks = link_peaks_3d(labels, min_overlap=0.5)
    assert _n_peaks(peaks) == 2
    assert peaks[2, 17, 11] == peaks[3, 17, 11] != peaks[0, 7, 7]
    # a peak drifting by a third of its width per frame stays one peak
    drifting = np.zeros((5, H, W), bool)
    for k in range(5):
        drifting[k, 5:11, 2 + 2 * k:8 + 2 * k] = True
    assert _n_peaks(link_peaks_3d(drifting)) == 1
    with pytest.raises(ValueError, match="min_overlap"):
        link_peaks_3d(labels, min_overlap=1.5)


def test_link_keeps_touching_instances_of_a_label_volume_apart():
    labels = np.zeros((3, H, W), np.int32)
    labels[:, 5:10, 5:10] = 1
    labels[:, 5:10, 10:15] = 2  # shares an edge with instance 1 in every frame
    peaks = link_peaks_3d(labels)
    assert _n_peaks(peaks) == 2
    assert len(np.unique(peaks[:, 5:10, 5:10])) == 1
    assert _n_peaks(link_peaks_3d(labels > 0)) == 1  # a bool union cannot tell them apart


def test_link_accepts_instances_and_respects_frame_numbers():
    masks = np.zeros((1, H, W), bool)
    masks[0, 3:6, 3:6] = True
    per_frame = [Instances.from_masks(masks, [0.5], SOURCE_FLAGS["ssl"]) for _ in range(3)]
    assert _n_peaks(link_peaks_3d(per_frame)) == 1
    stack = stack_labels(per_frame, (H, W))
    # frames 0, 1 then 5: the jump of 4 frames is a gap larger than max_gap
    labels = link_peaks_3d(stack, frame_numbers=[0, 1, 5], max_gap=1)
    assert _n_peaks(labels) == 2
    assert labels[0, 4, 4] == labels[1, 4, 4] != labels[2, 4, 4]
    assert _n_peaks(link_peaks_3d(stack, frame_numbers=[0, 1, 5], max_gap=3)) == 1


def test_link_min_frames_drops_short_peaks_and_renumbers():
    volume = _box_volume(8, [(0, 1, 2, 5, 2, 5), (1, 4, 10, 14, 10, 14), (5, 6, 2, 5, 20, 24), (4, 8, 18, 22, 2, 6)])
    assert _n_peaks(link_peaks_3d(volume)) == 4
    labels = link_peaks_3d(volume, min_frames=2)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    assert labels[1, 12, 12] == 1 and labels[6, 20, 4] == 2
    assert labels[0, 3, 3] == 0 and labels[5, 3, 22] == 0
    # a bridged gap counts the frames the peak is seen in
    gapped = _box_volume(5, [(0, 1, 2, 5, 2, 5), (2, 3, 2, 5, 2, 5)])
    assert _n_peaks(link_peaks_3d(gapped, min_frames=2)) == 1
    assert _n_peaks(link_peaks_3d(gapped, min_frames=3)) == 0


def test_link_rejects_bad_arguments_and_handles_empty():
    assert not link_peaks_3d(np.zeros((3, H, W), bool)).any()
    with pytest.raises(ValueError, match="max_gap"):
        link_peaks_3d(np.zeros((3, H, W), bool), max_gap=-1)
    with pytest.raises(ValueError, match="min_frames"):
        link_peaks_3d(np.zeros((3, H, W), bool), min_frames=0)
    with pytest.raises(ValueError, match="connectivity"):
        link_peaks_3d(np.zeros((3, H, W), bool), connectivity=4)
    with pytest.raises(ValueError, match="ascending"):
        link_peaks_3d(np.zeros((3, H, W), bool), frame_numbers=[0, 2, 1])


# ------------------------------------------------------------------------------ measuring


def _gaussian_scan(background: float = 10.0):
    """One 3D Gaussian peak, cut to its footprint, on a flat background: (counts, labels, signal, centre)."""
    n_frames = 9
    centre = (4.0, 11.0, 14.0)
    f, r, c = np.indices((n_frames, H, W), dtype=np.float64)
    signal = 500.0 * np.exp(-((f - centre[0]) ** 2 / 3.0 + (r - centre[1]) ** 2 / 4.0 + (c - centre[2]) ** 2 / 4.0))
    labels = np.zeros((n_frames, H, W), np.int32)
    labels[1:8, 7:16, 10:19] = 1  # symmetric about the centre
    signal[labels == 0] = 0.0  # the ring around the footprint holds background only
    counts = background + signal
    return counts, labels, signal, centre


def test_peaks_table_background_subtracted_intensity_and_centroid():
    counts, labels, signal, centre = _gaussian_scan()
    axis = np.linspace(20.0, 21.6, 9)  # 0.2 per frame
    table = peaks_table(labels, counts, axis_values=axis, axis_name="eta")
    assert list(table["id"]) == [1]
    assert table["intensity"][0] == pytest.approx(signal[labels == 1].sum(), rel=1e-9)
    assert table["background"][0] == pytest.approx(10.0)
    assert table["centroid_frame"][0] == pytest.approx(centre[0])
    assert table["centroid_row"][0] == pytest.approx(centre[1])
    assert table["centroid_col"][0] == pytest.approx(centre[2])
    assert table["eta"][0] == pytest.approx(20.0 + 0.2 * centre[0])
    assert (table["first_frame"][0], table["last_frame"][0], table["n_frames"][0]) == (1, 7, 7)
    assert [table[k][0] for k in ("frame0", "row0", "col0", "frame1", "row1", "col1")] == [1, 7, 10, 8, 16, 19]
    assert table["voxels"][0] == 7 * 9 * 9
    assert table["max_counts"][0] == pytest.approx(counts[labels == 1].max())
    assert table["models"] == ["unknown"] and np.isnan(table["score"][0])


def test_peaks_table_ignores_bad_pixels_and_other_peaks_in_the_ring():
    counts, labels, signal, _ = _gaussian_scan()
    reference = peaks_table(labels, counts)
    # a bright neighbouring peak and hot/dead bad pixels right next to the footprint
    counts[:, 7:16, 19:22] = 5000.0
    labels[:, 7:16, 19:22] = 2
    counts[:, 6, 10:19] = -1  # dead pixels (negative) in the ring
    bad = np.zeros(counts.shape, bool)
    bad[:, 16, 10:19] = True
    counts[:, 16, 10:19] = 1e6  # flagged hot pixels in the ring
    table = peaks_table(labels, counts, bad_pixels=bad)
    first = list(table["id"]).index(1)
    assert table["background"][first] == pytest.approx(10.0)
    assert table["intensity"][first] == pytest.approx(reference["intensity"][0])


def test_peaks_table_bad_voxels_inside_a_peak_count_as_background():
    counts, labels, signal, _ = _gaussian_scan()
    counts[4, 11, 14] = -2  # the brightest voxel is a gap pixel
    table = peaks_table(labels, counts)
    expected = signal[labels == 1].sum() - signal[4, 11, 14]
    assert table["intensity"][0] == pytest.approx(expected)
    assert table["bad_voxels"][0] == 1
    assert table["max_counts"][0] < 10.0 + signal[4, 11, 14]


def test_peaks_table_counts_from_array_callable_iterator_and_batches_agree():
    counts, labels, _, _ = _gaussian_scan()
    frames = np.arange(100, 109)
    from_array = peaks_table(labels, counts, frame_numbers=frames)
    from_callable = peaks_table(labels, lambda k: counts[k], frame_numbers=frames)
    from_iterator = peaks_table(labels, iter(list(counts)), frame_numbers=frames)
    from_batches = peaks_table(labels, (counts[i:i + 4] for i in range(0, 9, 4)), frame_numbers=frames)
    for other in (from_callable, from_iterator, from_batches):
        for name in ("intensity", "centroid_frame", "centroid_row", "first_frame", "voxels"):
            np.testing.assert_allclose(other[name], from_array[name])
    assert from_array["first_frame"][0] == 101 and from_array["centroid_frame"][0] == pytest.approx(104.0)
    with pytest.raises(ScanShapeError, match="gave 8 frames"):
        peaks_table(labels, iter(list(counts[:8])))


def test_peaks_table_scores_and_models_per_peak():
    counts, labels, _, _ = _gaussian_scan()
    labels[2:4, 0:4, 0:4] = 2
    scores = np.where(labels == 1, 0.3, 0.0).astype(np.float32)
    scores[5, 11, 14] = 0.9
    scores[labels == 2] = 0.6
    sources = np.zeros(labels.shape, np.uint8)
    sources[labels == 1] = SOURCE_FLAGS["tlm"]
    sources[6, 11, 14] = SOURCE_FLAGS["tlm"] | SOURCE_FLAGS["ssl"]
    sources[labels == 2] = SOURCE_FLAGS["ssl"]
    table = peaks_table(labels, counts, scores=scores, sources=sources)
    assert table["score"].tolist() == pytest.approx([0.9, 0.6])
    assert table["models"] == ["tlm+ssl", "ssl"]


def test_peaks_table_rejects_bad_input_and_handles_no_peaks():
    counts, labels, _, _ = _gaussian_scan()
    empty = peaks_table(np.zeros_like(labels), counts, axis_values=np.arange(9.0), axis_name="eta")
    assert all(len(v) == 0 for v in empty.values()) and "eta" in empty
    with pytest.raises(ScanShapeError):
        peaks_table(labels, counts[:, :5])
    with pytest.raises(ValueError, match="integer"):
        peaks_table(labels.astype(float), counts)


# ------------------------------------------------------------------------------ tables


def test_dataframe_and_csv_round_trip(tmp_path):
    pd = pytest.importorskip("pandas")
    counts, labels, _, _ = _gaussian_scan()
    labels[2:4, 0:4, 0:4] = 2
    table = peaks_table(labels, counts, axis_values=np.arange(9.0) * 0.5, axis_name="eta")
    frame = to_dataframe(table)
    assert list(frame.columns) == list(table) and len(frame) == 2
    path = write_peaks_csv(table, tmp_path / "peaks.csv")
    back = pd.read_csv(path)
    assert list(back.columns) == list(table)
    np.testing.assert_allclose(back["intensity"], table["intensity"])
    np.testing.assert_allclose(back["eta"], table["eta"])
    assert back["models"].tolist() == table["models"]
    assert [p.name for p in tmp_path.iterdir()] == ["peaks.csv"]  # no temp files left


# ------------------------------------------------------------------------------ scans


def _scan_result(n_frames: int = 6, skip_frame: int | None = 3) -> tuple[ScanResult, np.ndarray]:
    """A result with one peak found in every frame but ``skip_frame``, plus the counts."""
    rng = np.random.default_rng(4)
    counts = rng.poisson(5.0, (n_frames, H, W)).astype(np.float32)
    frames = {}
    for k in range(n_frames):
        masks = np.zeros((1, H, W), bool)
        masks[0, 8:12, 8:12] = True
        counts[k, 8:12, 8:12] += 100.0
        found = Instances.from_masks(masks if k != skip_frame else masks[:0], [0.5 + 0.05 * k], SOURCE_FLAGS["tlm"])
        frames[k] = ImageResult(frame=k, shape=(H, W), joint=found, tlm=found)
    axis = np.linspace(1.0, 2.0, n_frames)
    return ScanResult(frames=frames, axis_name="hkl_l", axis_values=axis, frame_shape=(H, W)), counts


def test_scan_peaks_links_through_a_missed_frame():
    result, counts = _scan_result()
    peaks = scan_peaks(result, counts)
    assert isinstance(peaks, Peaks3D) and len(peaks) == 1
    assert peaks.labels.shape == (6, H, W) and peaks.labels.dtype == np.int32
    assert peaks.table["n_frames"][0] == 6 and peaks.table["models"] == ["tlm"]
    assert peaks.table["score"][0] == pytest.approx(0.75)
    # five frames of 16 pixels with 100 counts above a Poisson(5) background
    assert peaks.table["intensity"][0] == pytest.approx(5 * 16 * 100.0, rel=0.05)
    assert 1.0 < peaks.table["hkl_l"][0] < 2.0
    assert len(scan_peaks(result, counts, max_gap=0)) == 2
    # the whole scan's counts work too; a wrong shape names what was expected
    assert len(scan_peaks(result, np.concatenate([counts, counts]))) == 1
    with pytest.raises(ScanShapeError, match="expected"):
        scan_peaks(result, counts[:, :4])
    with pytest.raises(ScanError, match="pass counts"):
        scan_peaks(result)
    frame = peaks.to_dataframe()
    assert len(frame) == 1


def test_scan_peaks_uses_the_frames_bad_pixel_masks():
    result, counts = _scan_result(skip_frame=None)
    clean = scan_peaks(result, counts)
    hot = counts.copy()
    hot[:, 7, 6:14] = 1e6  # hot row beside the peak, flagged in each frame's bad_pixels
    for frame in result:
        frame.bad_pixels = np.zeros((H, W), bool)
        frame.bad_pixels[7, 6:14] = True
    flagged = scan_peaks(result, hot)
    np.testing.assert_allclose(flagged.table["background"], clean.table["background"], rtol=0.1)
    assert flagged.table["max_counts"][0] < 1e6


def test_scan_peaks_rereads_counts_from_the_scan_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    result, counts = _scan_result(n_frames=6, skip_frame=None)
    raw = np.rint(counts).astype(np.int32)
    raw[:, 12, 8:12] = -1  # a dead row in the background ring, read back as bad pixels
    path = tmp_path / "scan.nxs"
    with h5py.File(path, "w") as h5:
        detector = h5.create_group("entry/instrument/pil3_100k")
        h5["entry"].attrs["NX_class"] = "NXentry"
        detector.attrs["NX_class"] = "NXdetector"
        detector.create_dataset("data", data=raw)
    del result.frames[3]  # held frames 0, 1, 2, 4, 5: read as two runs
    result.scan_path = str(path)
    held = raw[[0, 1, 2, 4, 5]]
    reread = scan_peaks(result, max_gap=1)
    given = scan_peaks(result, held)
    assert len(reread) == len(given) == 1
    for name in ("intensity", "background", "centroid_frame", "centroid_row", "max_counts", "first_frame", "last_frame"):
        np.testing.assert_allclose(reread.table[name], given.table[name])
    np.testing.assert_array_equal(reread.frame_numbers, [0, 1, 2, 4, 5])
    assert reread.table["last_frame"][0] == 5


def _reference_link(volume: np.ndarray, *, max_gap: int, connectivity: int, min_overlap: float, min_frames: int,
                    frame_numbers: np.ndarray) -> np.ndarray:
    """Whole-volume linking written independently of dipid: a union-find over touching instance
    pairs of every slice pair, each pair's rule as documented by link_peaks_3d."""
    from scipy import ndimage

    plane = ndimage.generate_binary_structure(2, min(connectivity, 2))
    ids = np.zeros(volume.shape, np.int64)
    n = 0
    for k in range(len(volume)):
        local = ndimage.label(volume[k], structure=plane)[0] if volume.dtype == bool else volume[k].astype(np.int64)
        ids[k] = np.where(local > 0, local + n, 0)
        n += int(local.max(initial=0))
    parent = list(range(n + 1))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    area = np.bincount(ids.ravel(), minlength=n + 1)
    _, height, width = volume.shape
    for a_k in range(len(volume)):
        for b_k in range(a_k + 1, len(volume)):
            distance = frame_numbers[b_k] - frame_numbers[a_k]
            if distance > max_gap + 1:
                break
            offsets = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if 1 + abs(dr) + abs(dc) <= connectivity]
            offsets = offsets if distance == 1 else [(0, 0)]
            touching: dict[tuple[int, int], set[int]] = {}
            for r in range(height):
                for c in range(width):
                    a = int(ids[a_k, r, c])
                    for dr, dc in offsets:
                        if a and 0 <= r + dr < height and 0 <= c + dc < width and ids[b_k, r + dr, c + dc]:
                            touching.setdefault((a, int(ids[b_k, r + dr, c + dc])), set()).add(r * width + c)
            for (a, b), pixels in touching.items():
                if len(pixels) >= min_overlap * min(area[a], area[b]):
                    parent[find(a)] = find(b)
    roots = {}
    out = np.zeros(volume.shape, np.int32)
    slices_of: dict[int, set[int]] = {}
    for i in range(1, n + 1):
        if area[i]:
            slices_of.setdefault(find(i), set()).add(int(np.flatnonzero((ids == i).any(axis=(1, 2)))[0]))
    for i in range(1, n + 1):  # ids run in first-appearance order
        if area[i] and len(slices_of[find(i)]) >= min_frames:
            roots.setdefault(find(i), len(roots) + 1)
            out[ids == i] = roots[find(i)]
    return out


def test_streamed_linking_matches_a_whole_volume_reference():
    rng = np.random.default_rng(11)
    for trial in range(40):
        n_frames = int(rng.integers(1, 7))
        volume = rng.random((n_frames, 9, 11)) < rng.uniform(0.2, 0.6)
        if trial % 2:  # integer per-frame instance labels, ids repeating between frames
            from scipy import ndimage

            volume = np.stack([ndimage.label(v)[0] for v in volume]).astype(np.int32)
        options = dict(max_gap=int(rng.integers(0, 3)), connectivity=int(rng.integers(1, 4)),
                       min_overlap=float(rng.choice([0.0, 0.3, 0.5, 1.0])), min_frames=int(rng.integers(1, 3)))
        frames = np.sort(rng.choice(12, n_frames, replace=False)) if trial % 3 == 0 else np.arange(n_frames)
        expected = _reference_link(volume, frame_numbers=frames, **options)
        np.testing.assert_array_equal(link_peaks_3d(volume, frame_numbers=frames, **options), expected)
        # the same, one slice at a time
        min_frames = options.pop("min_frames")
        linker = PeakLinker(**options)
        for k in range(n_frames):
            linker.add(volume[k], int(frames[k]))
        linker.finish(min_frames=min_frames)
        stack = linker.peak_labels(lambda k: volume[k], (9, 11))
        assert isinstance(stack, FrameStack) and stack.shape == volume.shape
        assert stack.max(initial=0) == expected.max(initial=0)
        for k in range(n_frames):
            np.testing.assert_array_equal(stack[k], expected[k])


def test_peak_linker_holds_only_the_last_slices():
    linker = PeakLinker(max_gap=2)
    frame = np.zeros((H, W), bool)
    frame[4:8, 4:8] = True
    for k in range(50):
        linker.add(frame, k)
        assert len(linker._window) <= 3, "only max_gap + 1 slices are kept"
    assert linker.finish().max() == 1 and linker.n_peaks == 1
    repeated = PeakLinker()
    repeated.add(frame, 3)
    with pytest.raises(ValueError, match="ascending"):
        repeated.add(frame, 3)
    with pytest.raises(RuntimeError, match="finish"):
        linker.add(frame, 99)


def test_scan_peaks_gives_lazy_labels_and_the_same_table_as_the_whole_volume():
    result, counts = _scan_result(n_frames=8, skip_frame=4)
    peaks = scan_peaks(result, counts)
    assert isinstance(peaks.label_frames, FrameStack)
    whole = link_peaks_3d(result.label_volume(), frame_numbers=result.frame_numbers)
    np.testing.assert_array_equal(peaks.labels, whole)
    table = peaks_table(whole, counts, frame_numbers=result.frame_numbers, axis_values=result.axis_values,
                        axis_name=result.axis_name)
    lazy = peaks_table(peaks.label_frames, counts, frame_numbers=result.frame_numbers,
                       axis_values=result.axis_values, axis_name=result.axis_name)
    for name in table:
        if name not in ("score", "models"):
            np.testing.assert_allclose(np.asarray(lazy[name], float), np.asarray(table[name], float), err_msg=name)


# ------------------------------------------------------------------------------ matching


def test_match_peaks_3d_counts_tp_fp_fn():
    truth = np.zeros((6, H, W), np.int32)
    truth[0:3, 2:6, 2:6] = 1
    truth[2:6, 10:14, 10:14] = 2
    truth[1:4, 18:22, 20:24] = 3
    pred = np.zeros_like(truth)
    pred[0:3, 2:6, 2:6] = 7  # exact
    pred[2:5, 10:14, 10:14] = 8  # 3 of 4 frames: IoU 0.75
    pred[1:4, 18:20, 20:22] = 9  # a quarter of peak 3: IoU 0.25
    pred[0:2, 0:2, 26:28] = 10  # nothing there
    result = match_peaks_3d(pred, truth, iou_threshold=0.5)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 2, 1)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(2 / 3)
    assert sorted(map(tuple, result["matches"].tolist())) == [(7, 1), (8, 2)]
    assert result["mean_iou"] == pytest.approx((1.0 + 0.75) / 2)
    loose = match_peaks_3d(pred, truth, iou_threshold=0.2)
    assert (loose["tp"], loose["fp"], loose["fn"]) == (3, 1, 0)


def test_match_peaks_3d_is_one_to_one():
    truth = np.zeros((2, H, W), np.int32)
    truth[:, 2:10, 2:10] = 1
    pred = np.zeros_like(truth)
    pred[:, 2:10, 2:9] = 1  # IoU 7/8
    pred[:, 2:10, 9:10] = 2  # same truth peak, IoU 1/8
    result = match_peaks_3d(pred, truth, iou_threshold=0.1)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)
    empty = match_peaks_3d(np.zeros_like(truth), np.zeros_like(truth))
    assert empty["precision"] == empty["recall"] == 1.0


def test_scan_peaks_and_read_counts_close_the_scans_they_open(tmp_path, monkeypatch):
    import dipid.io
    from dipid.io.scan import Scan
    from dipid.synth import simulate_scan

    path = simulate_scan(n_frames=4, preset="easy", seed=2).write(tmp_path, "s").nexus
    with dipid.io.open_scan(path) as scan:
        shape = scan.frame_shape
        counts = scan.read_frames([0, 1, 2, 3])[0]
    opened, closed = [], []
    real_open, real_close = dipid.io.open_scan, Scan.close

    def spy_open(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    def spy_close(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(dipid.io, "open_scan", spy_open)
    monkeypatch.setattr(Scan, "close", spy_close)
    masks = np.zeros((1, *shape), bool)
    masks[0, 5:9, 5:9] = True
    found = Instances.from_masks(masks, [0.9], SOURCE_FLAGS["tlm"])
    result = ScanResult(frames={k: ImageResult(frame=k, shape=shape, joint=found) for k in (0, 2, 3)},
                        axis_name="frame", axis_values=np.arange(4.0), frame_shape=shape, scan_path=str(path))
    np.testing.assert_array_equal(read_counts(result), counts[[0, 2, 3]])
    assert len(opened) == 1 and opened[0] in closed
    peaks = scan_peaks(result)
    assert len(opened) == 2 and opened[1] in closed
    assert peaks.table["max_counts"][0] == pytest.approx(counts[[0, 2, 3], 5:9, 5:9].max())
    # a scan the caller opened is read, not closed
    with real_open(path) as mine:
        read_counts(result, mine)
        assert mine not in closed
