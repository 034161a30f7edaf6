"""Tests of dipid.viz: outline maths, the plotly figures, the scan viewer and standalone HTML."""

from __future__ import annotations

import base64
import gzip
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from plotly.colors import sample_colorscale

from dipid import viz
from dipid.errors import DipidError, UnknownNameError
from dipid.results import SOURCE_FLAGS, ImageResult, Instances, ScanResult, SSLOutput

H, W = 24, 40


# ------------------------------------------------------------------------------------------------
# helpers: a tiny hand-made scan
# ------------------------------------------------------------------------------------------------
def _disc(centre_row: float, centre_col: float, radius: float, shape=(H, W)) -> np.ndarray:
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    return (rr - centre_row) ** 2 + (cc - centre_col) ** 2 <= radius**2


def _tiny_scan(n_frames: int = 4, *, axis_name: str = "eta"):
    """(counts (F, H, W) int32, ScanResult with tlm/ssl/joint, truth 3D peak labels (F, H, W))."""
    rng = np.random.default_rng(5)
    counts = rng.poisson(2.0, size=(n_frames, H, W)).astype(np.int32)
    peak_labels = np.zeros((n_frames, H, W), np.int32)
    frames = {}
    for k in range(n_frames):
        masks = [_disc(8, 8 + 2 * k, 3)]           # peak 1 drifts right, present in every frame
        if k >= 1:
            masks.append(_disc(16, 30, 2 + (k % 2)))  # peak 2 appears from frame 1
        for peak_id, m in enumerate(masks, start=1):
            counts[k][m] += 1000 * peak_id + 10 * k
            peak_labels[k][m] = peak_id
        stack = np.array(masks)
        joint = Instances.from_masks(stack, np.linspace(0.9, 0.6, len(masks)),
                                     SOURCE_FLAGS["tlm"] | SOURCE_FLAGS["ssl"])
        tlm = Instances.from_masks(stack[:1], [0.8], SOURCE_FLAGS["tlm"])
        ssl_inst = Instances.from_masks(stack, np.ones(len(masks)), SOURCE_FLAGS["ssl"])
        frames[k] = ImageResult(frame=k, shape=(H, W), joint=joint, tlm=tlm,
                                ssl=SSLOutput(probability=None, mask=ssl_inst.union_mask(), instances=ssl_inst))
    result = ScanResult(frames=frames, axis_name=axis_name, axis_values=np.linspace(10.0, 11.5, n_frames),
                        frame_shape=(H, W), scan_path="/data/1234.nxs")
    return counts, result, peak_labels


def _array(value) -> np.ndarray:
    """A trace property as numpy (plotly keeps numpy input as numpy; tuples/lists otherwise)."""
    return np.asarray(value)


def _exposed_sides(mask: np.ndarray) -> int:
    """Pixel sides between the mask and the outside, counted independently of mask_outline."""
    padded = np.pad(mask.astype(np.int8), 1)
    return int(np.abs(np.diff(padded, axis=0)).sum() + np.abs(np.diff(padded, axis=1)).sum())


def _loops(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """NaN-separated polylines -> list of (n, 2) point arrays."""
    points = np.stack([x, y], axis=1)
    pieces = [p[~np.isnan(p[:, 0])] for p in np.split(points, np.flatnonzero(np.isnan(x)))]
    return [p for p in pieces if len(p)]


# ------------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------------
def test_mask_outline_of_one_pixel_is_its_square():
    mask = np.zeros((5, 6), bool)
    mask[2, 3] = True
    x, y = viz.mask_outline(mask)
    assert len(x) == 5 and not np.isnan(x).any()
    assert (x[0], y[0]) == (x[-1], y[-1])
    assert set(x.tolist()) == {2.5, 3.5} and set(y.tolist()) == {1.5, 2.5}


def test_mask_outline_perimeter_equals_exposed_pixel_sides():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) > 0.55
    x, y = viz.mask_outline(mask)
    loops = _loops(x, y)
    length = 0.0
    for loop in loops:
        assert np.array_equal(loop[0], loop[-1]), "every loop is closed"
        steps = np.diff(loop, axis=0)
        assert np.all((steps[:, 0] == 0) | (steps[:, 1] == 0)), "edges run along pixel borders"
        length += np.abs(steps).sum()
    assert length == _exposed_sides(mask)
    # Every vertex sits on a pixel corner.
    assert np.all(np.mod(x[~np.isnan(x)] + 0.5, 1) == 0) and np.all(np.mod(y[~np.isnan(y)] + 0.5, 1) == 0)


def test_mask_outline_draws_holes_and_honours_offsets():
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    x, y = viz.mask_outline(ring, row_offset=10, col_offset=20)
    loops = _loops(x, y)
    assert len(loops) == 2
    outer = max(loops, key=lambda p: np.ptp(p[:, 0]))
    assert outer[:, 0].min() == 19.5 and outer[:, 0].max() == 24.5
    assert outer[:, 1].min() == 9.5 and outer[:, 1].max() == 14.5
    assert len(outer) == 5, "straight runs are merged into single segments"


def test_mask_outline_of_empty_mask_is_empty():
    x, y = viz.mask_outline(np.zeros((4, 4), bool))
    assert x.size == 0 and y.size == 0


def test_label_outlines_cover_each_label():
    labels = np.zeros((20, 30), np.int32)
    labels[2:6, 3:9] = 1
    labels[10:18, 20:25] = 3
    outlines = viz.label_outlines(labels)
    assert [o.label for o in outlines] == [1, 3]
    for outline in outlines:
        rows, cols = np.nonzero(labels == outline.label)
        assert outline.area == rows.size
        assert np.nanmin(outline.x) == cols.min() - 0.5 and np.nanmax(outline.x) == cols.max() + 0.5
        assert np.nanmin(outline.y) == rows.min() - 0.5 and np.nanmax(outline.y) == rows.max() + 0.5


def test_log_count_colorscale_follows_log_counts():
    top = 50_000.0
    scale = viz.log_count_colorscale(top)
    fractions = [f for f, _ in scale.colorscale]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b > a for a, b in zip(fractions, fractions[1:]))
    for fraction, colour in scale.colorscale:
        expected = sample_colorscale(viz.IMAGE_COLORSCALE, [math.log1p(fraction * top) / math.log1p(top)])[0]
        assert colour == expected
    counts = np.array(fractions) * top
    for decade in range(0, 4):  # stops inside every decade, or the image would look linear
        assert np.any((counts > 10**decade) & (counts < 10 ** (decade + 1)))
    assert scale.ticktext[-1] == "1e4" and scale.tickvals[-1] == pytest.approx(math.log1p(1e4))


def test_block_max_matches_a_loop():
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 100, size=(2, 7, 10)).astype(np.uint16)
    out = viz.block_max(volume, 3)
    assert out.shape == (2, 3, 4)
    for k in range(2):
        for i in range(3):
            for j in range(4):
                assert out[k, i, j] == volume[k, 3 * i:3 * i + 3, 3 * j:3 * j + 3].max()
    assert viz.block_max(volume, 1) is volume


def test_choose_downsample_is_the_smallest_factor_that_fits():
    factor = viz.choose_downsample(61, 195, 487, 3, 5_000_000)
    def size(f):
        return 61 * math.ceil(195 / f) * math.ceil(487 / f) * 3
    assert size(factor) <= 5_000_000 < size(factor - 1)
    assert viz.choose_downsample(2, 10, 10, 1, 10**6) == 1


def test_surface_voxels_of_a_cube_leave_out_its_centre():
    labels = np.zeros((5, 5, 5), np.int32)
    labels[1:4, 1:4, 1:4] = 7
    surface = viz.surface_voxels(labels)
    assert surface.sum() == 26 and not surface[2, 2, 2]
    # Two touching peaks: the faces where they meet are surface of both.
    labels[1:4, 1:4, 3] = 8
    surface = viz.surface_voxels(labels)
    assert surface[2, 2, 2] and surface[2, 2, 3]


def test_robust_maximum_ignores_a_few_hot_pixels():
    rng = np.random.default_rng(2)
    frames = [rng.poisson(3.0, size=(50, 60)).astype(np.float64) for _ in range(4)]
    frames[1][10, 10] = 1e6
    frames[2][20, 20] = 1e6
    pooled = np.sort(np.concatenate([f.ravel() for f in frames]))[::-1]
    rank = int(pooled.size * 1e-3)
    assert viz.robust_maximum(frames, fraction=1e-3) == pooled[rank - 1]
    assert viz.robust_maximum(frames, fraction=1e-3) < 100


def test_axis_title_units():
    assert viz.axis_title("eta") == "eta (deg)"
    assert viz.axis_title("hkl_l") == "hkl_l (r.l.u.)"
    assert viz.axis_title("sample_x") == "sample_x"
    assert viz.axis_title("sample_x", "mm") == "sample_x (mm)"


# ------------------------------------------------------------------------------------------------
# the 3D plot and the one-frame figure
# ------------------------------------------------------------------------------------------------
def test_generate_3d_plot_draws_every_voxel_at_its_axis_value():
    counts, result, _ = _tiny_scan()
    fig = viz.generate_3d_plot(result, "joint")
    assert [t.type for t in fig.data] == ["scatter3d"]
    trace = fig.data[0]
    volume = result.volume("joint")
    assert _array(trace.x).size == volume.sum()
    k, rows, cols = np.nonzero(volume)
    drawn = set(zip(_array(trace.z).tolist(), _array(trace.x).tolist(), np.round(_array(trace.y), 4).tolist()))
    expected = set(zip(rows.tolist(), cols.tolist(), np.round(result.axis_values[k].astype(np.float32), 4).tolist()))
    assert drawn == expected
    assert fig.layout.scene.yaxis.title.text == "eta (deg)"
    assert fig.layout.scene.xaxis.title.text == "column (pixel)"
    assert "frame" in trace.hovertemplate


def test_generate_3d_plot_subsamples_to_max_points():
    _, result, _ = _tiny_scan()
    fig = viz.generate_3d_plot(result, "tlm", max_points=15)
    trace = fig.data[0]
    assert _array(trace.x).size == 15
    volume = result.volume("tlm")
    for r, c in zip(_array(trace.z).tolist(), _array(trace.x).tolist()):
        assert volume[:, r, c].any(), "subsampled points are real voxels"


def test_generate_3d_plot_rejects_unknown_scan_type():
    _, result, _ = _tiny_scan()
    with pytest.raises(UnknownNameError) as err:
        viz.generate_3d_plot(result, "mask-rcnn")
    for name in ("tlm", "ssl", "joint", "classical"):
        assert name in str(err.value)


def test_show_image_predictions_outlines_each_instance_on_both_panels():
    counts, result, _ = _tiny_scan()
    frame = result[2]
    fig = viz.show_image_predictions(counts[2], frame, model="joint")
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 2
    assert np.allclose(_array(heatmaps[1].z), np.log1p(counts[2]))
    assert "counts" in heatmaps[1].hovertemplate
    joint_lines = [t for t in fig.data if t.type == "scatter" and t.name.startswith("joint #")]
    assert len(joint_lines) == 2 * len(frame.joint)
    assert len({t.line.color for t in joint_lines}) == len(frame.joint), "one colour per instance"
    assert all("score" in t.hovertemplate and "area" in t.hovertemplate for t in joint_lines)
    # The two networks' sets are overlaid and told apart by line style.
    dashes = {t.legendgroup: t.line.dash for t in fig.data if t.legendgroup in ("tlm", "ssl")}
    assert dashes == {"tlm": "dash", "ssl": "dot"}
    assert "frame 2" in fig.layout.title.text and "2 joint peaks" in fig.layout.title.text


def test_show_image_predictions_for_one_model_and_bad_input():
    counts, result, _ = _tiny_scan()
    frame = result[0]
    frame_no_ssl = ImageResult(frame=0, shape=(H, W), joint=frame.joint, tlm=frame.tlm)
    fig = viz.show_image_predictions(counts[0], frame_no_ssl, model="tlm")
    assert not any(t.legendgroup in ("tlm", "ssl") for t in fig.data), "no overlay when only one network ran"
    assert sum(t.name.startswith("TLM #") for t in fig.data) == 2 * len(frame.tlm)
    with pytest.raises(UnknownNameError):
        viz.show_image_predictions(counts[0], frame, model="best")
    with pytest.raises(DipidError, match="shape"):
        viz.show_image_predictions(counts[0, :10], frame)


# ------------------------------------------------------------------------------------------------
# the viewer
# ------------------------------------------------------------------------------------------------
def _viewer(n_frames: int = 4, **kwargs):
    counts, result, peak_labels = _tiny_scan(n_frames)
    volumes = {m: result.label_volume(m) for m in ("tlm", "ssl", "joint")}
    fig = viz.build_viewer(counts, volumes, peak_label_volume=peak_labels, axis_name="eta",
                           axis_values=result.axis_values, **kwargs)
    return fig, counts, volumes, peak_labels


def _trace_index(fig: go.Figure, predicate) -> list[int]:
    return [i for i, t in enumerate(fig.data) if predicate(t)]


def test_viewer_has_one_slider_step_and_frame_per_scan_frame():
    fig, counts, volumes, peak_labels = _viewer(4)
    assert len(fig.frames) == 4
    steps = fig.layout.sliders[0].steps
    assert [s.label.split()[0] for s in steps] == ["0", "1", "2", "3"]
    assert [s.args[0][0] for s in steps] == [f.name for f in fig.frames]
    assert all(s.method == "animate" for s in steps)
    kinds = {t.type for t in fig.data}
    assert {"scatter3d", "heatmap", "scatter", "table"} <= kinds
    (heat,) = _trace_index(fig, lambda t: t.type == "heatmap")
    for k, frame in enumerate(fig.frames):
        assert heat in frame.traces
        update = frame.data[list(frame.traces).index(heat)]
        # z holds the exact counts, customdata the 3D peak id of each pixel.
        assert np.array_equal(_array(update.z), counts[k])
        assert np.array_equal(_array(update.customdata), peak_labels[k])
    template = fig.data[heat].hovertemplate
    assert "counts %{z}" in template and "3D peak %{customdata}" in template


def test_viewer_outlines_follow_the_instances_of_each_frame():
    fig, counts, volumes, peak_labels = _viewer(4)
    outline_idx = _trace_index(fig, lambda t: t.type == "scatter" and (t.name or "").endswith("outlines"))
    assert len(outline_idx) == 3 * len(viz.PALETTE)
    for k, frame in enumerate(fig.frames):
        for model, label in (("tlm", "TLM"), ("ssl", "SSLM"), ("joint", "joint")):
            instances_drawn = set()
            for i in outline_idx:
                if fig.data[i].name != f"{label} outlines":
                    continue
                update = frame.data[list(frame.traces).index(i)]
                if update.customdata is not None and len(update.customdata):
                    x = _array(update.x)
                    instances_drawn |= set(_array(update.customdata)[~np.isnan(x), 0].tolist())
            # customdata[0] is the instance index i of label i + 1
            expected = set((np.unique(volumes[model][k])[1:] - 1).tolist())
            assert instances_drawn == expected, (k, model)
    # Outlines take no hover, so hovering a peak pixel shows its counts, not the outline.
    assert all(fig.data[i].hoverinfo == "skip" for i in outline_idx)


def test_viewer_outline_colours_match_the_3d_peaks():
    counts, result, peak_labels = _tiny_scan(3)
    # Peak ids unlike the per-frame instance numbers, so colouring by instance would show.
    renumbered = np.select([peak_labels == 1, peak_labels == 2], [5, 3], 0).astype(np.int32)
    volumes = {"joint": result.label_volume("joint")}
    fig = viz.build_viewer(counts, volumes, peak_label_volume=renumbered)
    checked = set()
    for frame in fig.frames:
        for i in frame.traces:
            if fig.data[i].name != "joint outlines":
                continue
            update = frame.data[list(frame.traces).index(i)]
            if update.customdata is None or not len(update.customdata):
                continue
            x = _array(update.x)
            for peak in set(_array(update.customdata)[~np.isnan(x), 2].tolist()):
                assert fig.data[i].line.color == viz.PALETTE[(peak - 1) % len(viz.PALETTE)]
                checked.add(peak)
    assert checked == {5, 3}
    voxel_colours = {t.marker.color for t in fig.data if t.type == "scatter3d" and t.name.startswith("peaks")
                     and t.customdata is not None and len(t.customdata)}
    assert voxel_colours == {viz.PALETTE[4], viz.PALETTE[2]}


def test_viewer_model_buttons_show_one_model_at_a_time():
    fig, *_ = _viewer(2)
    menu = next(m for m in fig.layout.updatemenus if any(b.label == "joint" for b in m.buttons))
    labels = [b.label for b in menu.buttons]
    assert labels == ["TLM", "SSLM", "joint", "no outlines"]
    for button in menu.buttons:
        visible, indices = button.args
        shown = {fig.data[i].name for i, v in zip(indices, visible["visible"]) if v}
        if button.label == "no outlines":
            assert shown == set()
        else:
            assert shown == {f"{button.label} outlines"}
    # joint starts visible
    assert all(t.visible for t in fig.data if t.name == "joint outlines")
    assert not any(t.visible for t in fig.data if t.name == "TLM outlines")


def test_viewer_3d_peaks_and_centroids():
    fig, counts, volumes, peak_labels = _viewer(4)
    voxels = [t for t in fig.data if t.type == "scatter3d" and t.name.startswith("peaks")]
    ids = np.concatenate([_array(t.customdata)[:, 0] for t in voxels if t.customdata is not None and len(t.customdata)])
    assert set(ids.tolist()) == {1, 2}
    assert all("3D peak" in t.hovertemplate for t in voxels)
    (centroids,) = [t for t in fig.data if t.name == "3D peak centroids"]
    assert list(centroids.text) == ["1", "2"]
    expected_col = np.nonzero(peak_labels == 1)[2].mean()
    assert centroids.x[0] == pytest.approx(expected_col)
    hover = centroids.hovertext[1]
    assert "3D peak 2" in hover and "frames 1–3" in hover and "eta (deg)" in hover
    # The summed counts of peak 2, computed here independently.
    assert f"summed counts {counts[peak_labels == 2].sum():.0f}" in hover
    (table,) = [t for t in fig.data if t.type == "table"]
    assert list(table.cells.values[0]) == [1, 2]


def test_viewer_reads_the_volume_module_peak_table():
    counts, result, peak_labels = _tiny_scan(4)
    volumes = {"joint": result.label_volume("joint")}
    table = {"id": [1, 2], "first_frame": [0, 1], "last_frame": [3, 3], "centroid_frame": [1.5, 2.0],
             "centroid_row": [8.0, 16.0], "centroid_col": [11.0, 30.0], "eta": [10.75, 11.0],
             "intensity": [123.0, 456.0], "voxels": [100, 40], "score": [0.9, float("nan")],
             "models": ["tlm+ssl", "ssl"]}
    fig = viz.build_viewer(counts, volumes, peak_table=table, peak_label_volume=peak_labels, axis_name="eta",
                           axis_values=result.axis_values)
    (centroids,) = [t for t in fig.data if t.name == "3D peak centroids"]
    assert list(centroids.y) == [10.75, 11.0]
    assert "intensity 456" in centroids.hovertext[1] and "models ssl" in centroids.hovertext[1]
    assert "score 0.900" in centroids.hovertext[0] and "score" not in centroids.hovertext[1]
    (table_trace,) = [t for t in fig.data if t.type == "table"]
    headers = [re.sub("<.*?>", "", h) for h in table_trace.header.values]
    assert headers[:3] == ["peak", "frames", "eta (deg)"] and "models" in headers
    with pytest.raises(DipidError, match="first_frame"):
        viz.build_viewer(counts, volumes, peak_table={"id": [1]}, peak_label_volume=peak_labels)


def test_viewer_subsamples_frames_and_shrinks_images_to_budget():
    fig, counts, *_ = _viewer(7, max_frames=3, max_image_bytes=3 * 12 * 20 * 3)
    assert [f.name for f in fig.frames] == ["0", "3", "6"]
    (heat,) = _trace_index(fig, lambda t: t.type == "heatmap")
    z = _array(fig.frames[-1].data[list(fig.frames[-1].traces).index(heat)].z)
    assert z.shape == (12, 20)
    assert z.max() == counts[6].max(), "block maxima keep the brightest pixel"
    assert "max of 2x2" in fig.data[heat].hovertemplate
    assert fig.data[heat].dx == 2 and fig.data[heat].x0 == 0.5


def test_viewer_without_counts_or_peaks():
    _, result, _ = _tiny_scan(3)
    fig = viz.build_viewer(None, {"joint": result.label_volume("joint")})
    (heat,) = _trace_index(fig, lambda t: t.type == "heatmap")
    masks = result.label_volume("joint") != 0
    for k, frame in enumerate(fig.frames):
        assert np.array_equal(_array(frame.data[list(frame.traces).index(heat)].z), masks[k])
    assert "mask %{z}" in fig.data[heat].hovertemplate
    (centroids,) = [t for t in fig.data if t.name == "3D peak centroids"]
    assert len(centroids.x) == 2, "connected regions stand in for 3D peaks"
    assert fig.layout.scene.yaxis.title.text == "frame (index)"


def test_viewer_starts_on_the_busiest_frame_or_the_one_asked_for():
    fig, *_ = _viewer(4)
    assert fig.layout.sliders[0].active != 0, "frame 0 has one instance, later frames two"
    fig, *_ = _viewer(4, start_frame=3)
    assert fig.layout.sliders[0].active == 3
    with pytest.raises(DipidError, match="start_frame"):
        _viewer(4, start_frame=9)


def test_viewer_rejects_mismatched_inputs():
    counts, result, peak_labels = _tiny_scan(3)
    volumes = {"joint": result.label_volume("joint")}
    with pytest.raises(DipidError, match="counts"):
        viz.build_viewer(counts[:2], volumes)
    with pytest.raises(DipidError, match="peak_label_volume"):
        viz.build_viewer(counts, volumes, peak_label_volume=peak_labels[:, :5])
    with pytest.raises(DipidError, match="axis_values"):
        viz.build_viewer(counts, volumes, axis_values=[1.0, 2.0])
    with pytest.raises(UnknownNameError):
        viz.build_viewer(counts, {"maskrcnn": volumes["joint"]})
    with pytest.raises(DipidError):
        viz.build_viewer(counts, {})


def test_viewer_accepts_a_frame_provider():
    counts, result, peak_labels = _tiny_scan(3)
    asked = []

    def provider(k: int) -> np.ndarray:
        asked.append(k)
        return counts[k]

    fig = viz.build_viewer(provider, {"joint": result.label_volume("joint")}, peak_label_volume=peak_labels)
    (heat,) = _trace_index(fig, lambda t: t.type == "heatmap")
    assert np.array_equal(_array(fig.frames[2].data[list(fig.frames[2].traces).index(heat)].z), counts[2])
    assert set(asked) == {0, 1, 2}


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------
def _packed_figure(page: str) -> dict:
    data = re.search(r'id="dipid-figure-data">([^<]*)</script>', page).group(1)
    return json.loads(gzip.decompress(base64.b64decode(data)))


def test_save_html_plain_page_is_standalone(tmp_path: Path):
    counts, result, _ = _tiny_scan(2)
    fig = viz.show_image_predictions(counts[1], result[1])
    path = viz.save_html(fig, tmp_path / "frame.html", compress=False)
    page = path.read_text(encoding="utf-8")
    assert "plotly.js v" in page, "plotly.js is embedded"
    assert not re.search(r"<script[^>]+src=[\"']https?:", page), "no script loaded from the network"
    assert "<title>frame 1:" in page
    assert "Plotly.newPlot" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame.html"], "no temporary files left"


def test_save_html_compressed_page_holds_the_whole_figure(tmp_path: Path):
    fig, *_ = _viewer(3)
    path = viz.save_html(fig, tmp_path / "viewer.html", compress=True)
    page = path.read_text(encoding="utf-8")
    assert "plotly.js v" in page and "DecompressionStream" in page
    assert not re.search(r"<script[^>]+src=[\"']https?:", page)
    packed = _packed_figure(page)
    assert len(packed["data"]) == len(fig.data) and len(packed["frames"]) == 3
    # Arrays travel as base64 typed arrays (plotly >= 6), not as JSON number lists.
    heat = next(t for t in packed["data"] if t["type"] == "heatmap")
    assert isinstance(heat["z"], dict) and "bdata" in heat["z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["viewer.html"]


def test_save_html_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fig, *_ = _viewer(2)
    target = tmp_path / "viewer.html"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        viz.save_html(fig, target)
    assert list(tmp_path.iterdir()) == []


def test_view_scan_result_writes_the_result_frames(tmp_path: Path):
    counts, result, peak_labels = _tiny_scan(5)
    # Keep frames 1..3 only, with the whole scan's counts: the viewer indexes them by frame number.
    subset = ScanResult(frames={k: result[k] for k in (1, 2, 3)}, axis_name="eta", axis_values=result.axis_values,
                        frame_shape=(H, W), scan_path=result.scan_path)
    path = viz.view_scan_result(subset, counts, tmp_path / "scan.html", compress=True)
    packed = _packed_figure(path.read_text(encoding="utf-8"))
    assert [f["name"] for f in packed["frames"]] == ["1", "2", "3"]
    labels = [b["label"] for m in packed["layout"]["updatemenus"] for b in m["buttons"]]
    assert "TLM" in labels and "SSLM" in labels and "classical" not in labels
    steps = packed["layout"]["sliders"][0]["steps"]
    assert steps[0]["label"] == f"1  (eta = {result.axis_values[1]:.5g})"
    assert "<title>1234.nxs: 3 frames" in path.read_text(encoding="utf-8")
    with pytest.raises(DipidError, match="frames"):
        viz.view_scan_result(subset, counts[:2], tmp_path / "bad.html")


def test_full_size_viewer_of_61_frames_stays_under_15_mb(tmp_path: Path):
    """The size target for a Pilatus 100K scan of 61 frames, with counts up to the saturation value."""
    n, h, w = 61, 195, 487
    rng = np.random.default_rng(3)
    counts = rng.poisson(3.0, size=(n, h, w)).astype(np.int32)
    labels = np.zeros((n, h, w), np.int32)
    rr, cc = np.mgrid[0:h, 0:w]
    for k in range(n):
        for i, (r, c) in enumerate(((50, 100), (120, 300), (90, 420))):
            blob = (rr - r) ** 2 + (cc - c - k) ** 2 <= (6 + i) ** 2
            labels[k][blob] = i + 1
            counts[k][blob] += rng.poisson(5000.0 * (i + 1), size=blob.sum())
    counts[:, 10, 10] = 1_000_000  # saturated pixel: counts need 32 bits
    path = viz.write_viewer(tmp_path / "big.html", counts, {"joint": labels}, peak_label_volume=labels,
                            axis_name="eta", axis_values=np.linspace(0, 3, n))
    size = path.stat().st_size
    assert size < 15_000_000, f"{size / 1e6:.1f} MB"
    packed = _packed_figure(path.read_text(encoding="utf-8"))
    heat = next(t for t in packed["data"] if t["type"] == "heatmap")
    assert heat["z"]["shape"].replace(" ", "") == f"{h},{w}", "61 frames fit at full resolution"


def test_write_viewer_shrinks_images_when_the_page_is_too_large(tmp_path: Path):
    counts, result, peak_labels = _tiny_scan(3)
    volumes = {"joint": result.label_volume("joint")}
    full = viz.write_viewer(tmp_path / "full.html", counts, volumes, peak_label_volume=peak_labels, compress=True)
    full_size = full.stat().st_size
    small = viz.write_viewer(tmp_path / "small.html", counts, volumes, peak_label_volume=peak_labels, compress=True,
                             max_html_bytes=full_size - 1)
    assert small.stat().st_size <= full_size - 1
    packed = _packed_figure(small.read_text(encoding="utf-8"))
    heat = next(t for t in packed["data"] if t["type"] == "heatmap")
    assert heat["z"]["shape"].replace(" ", "") == f"{H // 2},{W // 2}"
    assert packed["layout"]["meta"]["image_shrink"] == 2


def test_view_scan_result_takes_a_peaks3d_object(tmp_path: Path):
    from types import SimpleNamespace

    counts, result, peak_labels = _tiny_scan(3)
    table = {"id": [1, 2], "first_frame": [0, 1], "last_frame": [2, 2], "centroid_row": [8.0, 16.0],
             "centroid_col": [10.0, 30.0], "centroid_frame": [1.0, 1.5], "voxels": [90, 30]}
    peaks = SimpleNamespace(table=table, labels=peak_labels, frame_numbers=np.arange(3))
    path = viz.view_scan_result(result, counts, tmp_path / "v.html", peak_table=peaks, compress=True)
    packed = _packed_figure(path.read_text(encoding="utf-8"))
    centroids = next(t for t in packed["data"] if t.get("name") == "3D peak centroids")
    assert centroids["text"] == ["1", "2"]
    # Axis centroid interpolated from centroid_frame: frame 1.5 lies halfway between frames 1 and 2.
    axis = _array(centroids["y"]) if not isinstance(centroids["y"], dict) else np.frombuffer(
        base64.b64decode(centroids["y"]["bdata"]), dtype=np.dtype(centroids["y"]["dtype"]))
    assert axis[1] == pytest.approx(result.axis_values[1:3].mean())
    peaks.frame_numbers = np.arange(1, 4)
    with pytest.raises(DipidError, match="other frames"):
        viz.view_scan_result(result, counts, tmp_path / "w.html", peak_table=peaks)


def test_generate_3d_plot_of_a_scan_without_masks():
    empty = ScanResult(frames={0: ImageResult(frame=0, shape=(H, W), joint=Instances.empty((H, W)))},
                       axis_name="hkl_l", axis_values=np.array([1.0]), frame_shape=(H, W))
    fig = viz.generate_3d_plot(empty)
    assert _array(fig.data[0].x).size == 0
    assert any("no masked pixels" in a.text for a in fig.layout.annotations)
    assert fig.layout.scene.yaxis.title.text == "hkl_l (r.l.u.)"


def test_package_names_resolve_and_geometry_needs_no_plotly():
    import subprocess
    import sys

    for name in viz.__all__:
        assert getattr(viz, name) is not None
    code = ("import sys, dipid.viz, dipid.viz.geometry; from dipid.viz import mask_outline, PALETTE; "
            "print('plotly' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    with pytest.raises(AttributeError, match="no_such_name"):
        viz.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------------------------
# long scans: bounded pages, frames read one at a time
# ------------------------------------------------------------------------------------------------
def _long_scan(n_frames: int, shape=(48, 64)):
    """A ScanResult of n_frames with one drifting peak, and a counts provider that records its reads."""
    h, w = shape
    frames, reads = {}, []
    for k in range(n_frames):
        mask = _disc(h / 2, 8 + (k % (w - 16)), 4, shape=shape)
        inst = Instances.from_masks(mask[None], [0.9], SOURCE_FLAGS["classical"])
        frames[k] = ImageResult(frame=k, shape=shape, joint=inst, classical=inst)
    result = ScanResult(frames=frames, axis_name="eta", axis_values=np.linspace(0, 1, n_frames), frame_shape=shape)

    def counts(k: int) -> np.ndarray:
        reads.append(k)
        # noisy frames (they compress badly), the same on every read; the peak bright
        frame = np.random.default_rng(k).poisson(200.0, shape).astype(np.float32)
        frame[result.frames[k].joint.union_mask()] += 5000
        return frame

    return result, counts, reads


def test_viewer_of_a_long_scan_reads_each_shown_frame_once_and_says_what_it_shows(tmp_path: Path):
    from dipid.volume import scan_peaks

    result, counts, reads = _long_scan(400)
    peaks = scan_peaks(result, np.stack([counts(k) for k in range(len(result))]))
    reads.clear()
    path = viz.view_scan_result(result, counts, tmp_path / "long.html", peak_table=peaks, compress=True)
    packed = _packed_figure(path.read_text(encoding="utf-8"))
    shown = [int(f["name"]) for f in packed["frames"]]
    assert len(shown) == 121 and shown[0] == 0 and shown[-1] == 399
    assert sorted(reads) == sorted(set(reads)) == shown, "only the shown frames are read, once each"
    notes = [a["text"] for a in packed["layout"].get("annotations", [])]
    assert any("showing 121 of 400 frames" in note for note in notes)
    assert packed["layout"]["meta"]["frames_total"] == 400
    # the 3D peaks and the table cover every frame, not only the shown ones
    table = next(t for t in packed["data"] if t["type"] == "table")
    assert len(table["cells"]["values"][0]) == len(peaks)


def test_viewer_page_stays_under_its_budget_by_showing_fewer_frames(tmp_path: Path):
    result, counts, _ = _long_scan(200)
    volumes = {"joint": result.label_frames("joint")}
    full = viz.write_viewer(tmp_path / "full.html", counts, volumes, image_shrink=8, compress=True)
    budget = full.stat().st_size - 1  # even 8 x 8 binned frames do not fit: fewer frames must be shown
    small = viz.write_viewer(tmp_path / "small.html", counts, volumes, compress=True, max_html_bytes=budget)
    assert small.stat().st_size <= budget
    packed = _packed_figure(small.read_text(encoding="utf-8"))
    meta = packed["layout"]["meta"]
    assert meta["image_shrink"] == 8 and meta["frames_shown"] < 121 and len(packed["frames"]) == meta["frames_shown"]
    note = " ".join(a["text"] for a in packed["layout"]["annotations"])
    assert f"showing {meta['frames_shown']} of 200 frames" in note and "binned 8 x 8" in note


def test_viewer_of_a_short_scan_has_no_reduction_note():
    fig, *_ = _viewer(4)
    assert not [a for a in fig.layout.annotations if a.name == "reduction note"]
    assert fig.layout.meta["frames_total"] == fig.layout.meta["frames_shown"] == 4
