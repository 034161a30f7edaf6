"""Tests of the large-detector fast paths of `dipid predict --model classical` (issue 14).

The classical finder runs on whole frames (only the networks are tiled); the viewer plans its
binning before building; the exact shortcuts of robust_maximum, block_max, the surface voxels
and PeakLinker.peak_frame give what the plain whole-array code gives.
"""

from __future__ import annotations

import numpy as np
import pytest

from dipid.classical import ClassicalFinder
from dipid.decode import classical_instances
from dipid.predict import JointPredictor, PredictorSettings
from dipid.results import SOURCE_FLAGS, ImageResult, Instances, ScanResult


def _frame_with_peaks(shape=(700, 600), seed=0) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    rng = np.random.default_rng(seed)
    h, w = shape
    frame = rng.poisson(2.0, shape).astype(np.float32)
    # peaks on the cut lines of a 256-pixel tile grid, and one larger than the tile overlap
    centres = [(200, 250, 5.0), (250, 100, 5.0), (500, 470, 30.0), (90, 520, 4.0)]
    yy, xx = np.mgrid[0:h, 0:w]
    for r, c, sigma in centres:
        frame += 3000 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2))
    return frame, centres


def _same_instances(a: Instances, b: Instances) -> None:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.label_image(), b.label_image())
    np.testing.assert_allclose(a.scores, b.scores)


def test_classical_runs_on_the_whole_frame_even_above_the_tile_size(monkeypatch):
    frame, centres = _frame_with_peaks()
    settings = PredictorSettings(tile_size=256, tile_overlap=32)
    predictor = JointPredictor(device="cpu", settings=settings)

    def no_tiles(*args, **kwargs):
        raise AssertionError("the classical finder alone must not be tiled")

    monkeypatch.setattr(predictor, "_predict_tiled", no_tiles)
    found = predictor.predict_one_image(frame, models="classical")
    whole = classical_instances(ClassicalFinder()(frame[None], (frame < 0)[None])[0])
    _same_instances(found.classical, whole)
    assert len(found.classical) == len(centres)
    assert "classical" in found.timings


def test_with_a_network_the_network_is_tiled_and_classical_is_not():
    from dipid.models import build_sslm

    frame, _ = _frame_with_peaks()
    settings = PredictorSettings(tile_size=256, tile_overlap=32)
    predictor = JointPredictor(sslm=build_sslm(channels=8), device="cpu", settings=settings)
    tiled_calls = []
    original = predictor._predict_tiled

    def spy(counts, bad, frame_number, run, **kwargs):
        tiled_calls.append(run)
        return original(counts, bad, frame_number, run, **kwargs)

    predictor._predict_tiled = spy
    found = predictor.predict_one_image(frame, models=("ssl", "classical"))
    assert tiled_calls == [("ssl", "classical")]  # the frame is tiled for the SSLM
    whole = classical_instances(ClassicalFinder()(frame[None], (frame < 0)[None])[0])
    _same_instances(found.classical, whole)
    assert found.ssl is not None and found.ssl.probability.shape == frame.shape


def test_tiled_instances_merge_across_tile_borders():
    """The tile machinery the networks use (cut, keep the core, shift, merge) gives whole peaks
    once, also for peaks on the cut lines and one larger than the overlap (what the classical
    finder run per tile checked before it ran on whole frames; same frame and grid)."""
    from dipid.metrics import mask_iou_matrix
    from dipid.tiling import in_core, merge_tiled_instances, shift_instances, tile_grid

    rng = np.random.default_rng(0)
    h, w = 1100, 1000
    frame = rng.poisson(2.0, (h, w)).astype(np.float32)
    tiles = tile_grid((h, w), tile=512, overlap=64)
    assert len(tiles) > 1
    centres = [(200, tiles[0].x1 - 32, 6), (tiles[0].y1 - 30, 300, 6), (700, tiles[1].x1 - 20, 45)]
    yy, xx = np.mgrid[0:h, 0:w]
    for r, c, sigma in centres:
        frame += 3000 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2))
    finder = ClassicalFinder()
    per_tile = [shift_instances(in_core(classical_instances(finder(frame[t.slices][None])[0]), t), t, (h, w))
                for t in tiles]
    merged = merge_tiled_instances(per_tile, (h, w))
    whole = classical_instances(finder(frame[None])[0])
    assert len(merged) == len(whole) == 3
    cents = merged.centroids()
    for r, c, _ in centres:
        assert np.min(np.hypot(cents[:, 0] - r, cents[:, 1] - c)) < 3
    # the merged masks equal those of the untiled frame up to a thin border effect
    iou = mask_iou_matrix(merged.masks, whole.masks)
    assert np.all(iou.max(axis=1) > 0.9)


# ------------------------------------------------------------------------------------------------
# exact shortcuts
# ------------------------------------------------------------------------------------------------
def _robust_maximum_reference(frames, fraction=1e-4):
    values = np.concatenate([np.asarray(f, np.float64).ravel() for f in frames])
    values = np.sort(values[np.isfinite(values)])
    total = sum(np.size(f) for f in frames)
    rank = max(1, int(total * fraction))
    return float(values[values.size - min(rank, values.size)]) if values.size else 0.0


@pytest.mark.parametrize("fraction", [1e-4, 1e-2, 0.3])
def test_robust_maximum_equals_a_sort_of_all_pixels(fraction):
    from dipid.viz.geometry import robust_maximum

    rng = np.random.default_rng(1)
    frames = [rng.poisson(5.0, (60, 70)).astype(np.float32) for _ in range(6)]
    frames[2][3, 4] = np.nan
    frames[3][:2, :] = np.inf
    frames[4][10:12, 10:12] = 1e6  # hot pixels
    frames.append(np.full((60, 70), np.nan, np.float32))
    frames.append(rng.integers(0, 50, (60, 70)).astype(np.int32))
    expected = _robust_maximum_reference(frames, fraction)
    assert robust_maximum(frames, fraction=fraction) == expected
    total = sum(f.size for f in frames)
    assert robust_maximum(iter(frames), fraction=fraction, total=total) == expected


def test_block_max_equals_the_maximum_of_each_block():
    from dipid.viz.geometry import block_max

    rng = np.random.default_rng(2)
    for shape in [(2, 7, 9), (1, 16, 8), (3, 5, 1)]:
        for factor in (1, 2, 3, 4, 8):
            for volume in (rng.normal(size=shape).astype(np.float32), rng.integers(0, 60000, shape).astype(np.uint16)):
                out = block_max(volume, factor)
                f, h, w = shape
                assert out.shape == (f, -(-h // factor), -(-w // factor))
                for i in range(out.shape[1]):
                    for j in range(out.shape[2]):
                        block = volume[:, i * factor:(i + 1) * factor, j * factor:(j + 1) * factor]
                        np.testing.assert_array_equal(out[:, i, j], block.max(axis=(1, 2)))


def test_surface_pixels_equal_the_whole_frame_definition():
    from dipid.viz.geometry import (
        _frames_with_neighbours,
        _surface_pixels,
        surface_voxels,
    )

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (5, 12, 15)) * (rng.random((5, 12, 15)) < 0.5)
    padded = np.pad(labels, 1)
    expected = np.zeros(labels.shape, bool)
    for k in range(labels.shape[0]):
        here = padded[k + 1, 1:-1, 1:-1]
        differs = np.zeros(here.shape, bool)
        for dk, dr, dc in ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)):
            differs |= padded[k + 1 + dk, 1 + dr:padded.shape[1] - 1 + dr, 1 + dc:padded.shape[2] - 1 + dc] != here
        expected[k] = differs & (here != 0)
    np.testing.assert_array_equal(surface_voxels(labels), expected)
    for k, before, here, after in _frames_with_neighbours(labels):
        rows, cols = _surface_pixels(before, here, after)
        np.testing.assert_array_equal(np.stack([rows, cols]), np.stack(np.nonzero(expected[k])))


def test_peak_frame_equals_the_id_lookup_of_every_pixel():
    from dipid.volume import PeakLinker

    rng = np.random.default_rng(4)
    linker = PeakLinker()
    frames = []
    for _ in range(6):
        labels = np.zeros((30, 40), np.int32)
        for i in range(1, rng.integers(1, 6)):
            r, c = rng.integers(0, 25), rng.integers(0, 35)
            labels[r:r + 5, c:c + 5] = i
        frames.append(labels)
        linker.add(labels)
    id_to_peak = linker.finish(min_frames=2)
    for k, labels in enumerate(frames):
        ids = np.where(labels > 0, labels + linker._offsets[k], 0)
        expected = id_to_peak[ids]
        got = linker.peak_frame(k, labels)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------------------------
# the viewer plans its page before building
# ------------------------------------------------------------------------------------------------
def _noisy_scan(n_frames: int, shape=(300, 320)):
    frames = {}
    for k in range(n_frames):
        mask = np.zeros(shape, bool)
        mask[100 + k:110 + k, 50:62] = True
        inst = Instances.from_masks(mask[None], [0.9], SOURCE_FLAGS["classical"])
        frames[k] = ImageResult(frame=k, shape=shape, joint=inst, classical=inst)
    result = ScanResult(frames=frames, axis_name="eta", axis_values=np.linspace(0, 1, n_frames), frame_shape=shape)

    def counts(k: int) -> np.ndarray:
        # noise compresses badly, so the images decide the page's size
        return np.random.default_rng(k).poisson(300.0, shape).astype(np.float32)

    return result, counts


def test_viewer_over_budget_is_built_once_with_the_planned_shrink(tmp_path, monkeypatch):
    from dipid import viz
    from dipid.viz import viewer
    from dipid.viz.page import page_overhead

    result, counts = _noisy_scan(12)
    volumes = {"joint": result.label_frames("joint")}
    builds = []
    real_build = viewer.build_viewer

    def counting_build(*args, **kwargs):
        builds.append(kwargs.get("image_shrink"))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(viewer, "build_viewer", counting_build)
    full = viz.write_viewer(tmp_path / "full.html", counts, volumes, compress=True)
    assert builds == [None], "a page within its budget is built once, as build_viewer chooses"
    figure_bytes = full.stat().st_size - page_overhead()
    # room for about a third of the full-resolution figure: the images must be shrunk about 2x
    budget = page_overhead() + figure_bytes // 3
    builds.clear()
    small = viz.write_viewer(tmp_path / "small.html", counts, volumes, compress=True, max_html_bytes=budget)
    assert small.stat().st_size <= budget
    assert len(builds) == 1 and builds[0] is not None and builds[0] > 1, builds


def test_viewer_plan_shows_fewer_frames_when_the_largest_shrink_is_not_enough(tmp_path, monkeypatch):
    from dipid.viz import viewer
    from dipid.viz.page import page_overhead

    result, counts = _noisy_scan(40)
    volumes = {"joint": result.label_frames("joint")}
    at_8 = viewer.write_viewer(tmp_path / "at8.html", counts, volumes, image_shrink=8, compress=True)
    per_frame = (at_8.stat().st_size - page_overhead()) / 41
    plan = viewer._plan_reduction(viewer._CachedFrames(counts, 10**9), volumes, {},
                                  page_overhead() + int(per_frame * 12))
    assert plan["image_shrink"] == 8
    assert 5 <= plan["max_frames"] < 40


def test_viewer_figure_is_the_same_as_a_validated_one(monkeypatch):
    """build_viewer skips plotly's validation for speed; its JSON must be what validation gives."""
    import base64
    import json

    import plotly.graph_objects as go

    from dipid.viz import viewer

    result, counts = _noisy_scan(4, shape=(40, 50))
    volumes = {"joint": result.label_frames("joint"), "classical": result.label_frames("classical")}
    table = {"id": [1], "first_frame": [0], "last_frame": [3], "centroid_row": [105.0], "centroid_col": [55.0],
             "centroid_frame": [1.5], "voxels": [480], "score": [0.9], "models": ["classical"]}

    def decoded(value):
        if isinstance(value, dict) and {"dtype", "bdata"} <= set(value):
            return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"])).tolist()
        if isinstance(value, dict):
            return {k: decoded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decoded(v) for v in value]
        return value

    fast = viewer.build_viewer(counts, volumes, peak_table=table)
    real_figure, real_table, real_frame = go.Figure, go.Table, go.Frame
    monkeypatch.setattr(go, "Figure", lambda *a, _validate=True, **k: real_figure(*a, **k))
    monkeypatch.setattr(go, "Table", lambda *a, _validate=True, **k: real_table(*a, **k))
    monkeypatch.setattr(go, "Frame", lambda *a, _validate=True, **k: real_frame(*a, **k))
    checked = viewer.build_viewer(counts, volumes, peak_table=table)
    assert fast._validate is False and checked._validate is True  # the two builds differ as meant
    assert decoded(json.loads(fast.to_json())) == decoded(json.loads(checked.to_json()))


def test_label_volumes_store_only_the_chunks_holding_labels(tmp_path):
    import h5py

    from dipid.io._hdf5 import frames_with_data
    from dipid.io.results_nexus import _write_volume

    rng = np.random.default_rng(6)
    volume = np.zeros((4, 300, 270), np.int32)  # 3 x 3 chunks of 128 a frame, edge chunks partial
    volume[1, 5:9, 10:14] = 7
    volume[1, 290:300, 260:270] = 2**20  # in the corner (edge) chunk
    volume[3] = rng.integers(0, 3, (300, 270))  # labels in every chunk
    # frames 0 and 2 hold no label
    with h5py.File(tmp_path / "v.h5", "w") as h5:
        seen = []
        dataset = _write_volume(h5, "labels", volume, np.int32, on_frame=lambda k, f: seen.append(k))
        assert seen == [0, 1, 2, 3]
        assert dataset.compression == "gzip" and dataset.chunks == (1, 128, 128)
        assert dataset.id.get_num_chunks() == 1 + 2 + 1 + 9  # a frame without labels keeps its first chunk
    with h5py.File(tmp_path / "v.h5", "r") as h5:
        np.testing.assert_array_equal(h5["labels"][()], volume)
        written = frames_with_data(h5["labels"])
        assert written is None or written.all()  # every frame has storage
    small = np.zeros((2, 20, 30), np.uint16)
    small[1, 3, 4] = 9
    with h5py.File(tmp_path / "s.h5", "w") as h5:
        assert _write_volume(h5, "labels", small).chunks == (1, 20, 30)
        np.testing.assert_array_equal(h5["labels"][()], small)
