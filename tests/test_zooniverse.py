"""Zooniverse export -> consensus labels, on the real I16 export the original DiPID was trained on."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from dipid.errors import LabelError, UnknownNameError
from dipid.io.coco import read_coco
from dipid.io.zooniverse import (
    consensus_instances,
    convert_zooniverse,
    rasterize_polygons,
    read_zooniverse,
    zooniverse_to_labels,
)

FIXTURES = Path(__file__).resolve().parent / "data"  # inside the repository (tests/data/README.md)
CSV = FIXTURES / "dipid_zooniverse_labels.csv"
H, W = 195, 487
SCANS = {"794625", "794661", "794663", "794673", "794689", "794710", "794910", "794916"}


@pytest.fixture(scope="module")
def classifications():
    return read_zooniverse(CSV)


@pytest.fixture(scope="module")
def by_image(classifications):
    groups = defaultdict(list)
    for c in classifications:
        groups[c.image_key].append(c)
    return groups


@pytest.fixture(scope="module")
def labels():
    return zooniverse_to_labels(CSV)


# --- independent references ---------------------------------------------------------------------

def even_odd_reference(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixel (r, c) is inside when its centre (c + .5, r + .5) is inside by the even-odd rule."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    inside = np.zeros((h, w), bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        if y0 == y1:
            continue
        crosses = (y0 > ys) != (y1 > ys)
        x_cross = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_cross)
    return inside


def distance_to_outline(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w) distance in pixels from each pixel centre to the polygon's outline."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    best = np.full((h, w), np.inf)
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        d = b - a
        t = np.clip(((xs - a[0]) * d[0] + (ys - a[1]) * d[1]) / max(d @ d, 1e-12), 0, 1)
        best = np.minimum(best, np.hypot(xs - a[0] - t * d[0], ys - a[1] - t * d[1]))
    return best


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def reference_consensus(volunteers: list[np.ndarray], threshold: float = 0.3) -> list[np.ndarray]:
    """The documented majority rule, written out plainly with a cluster label per outline."""
    outlines = [(v, m) for v, masks in enumerate(volunteers) for m in masks]
    if len(volunteers) == 1:
        return [m for _, m in outlines]
    label = list(range(len(outlines)))
    pairs = sorted(((iou(outlines[i][1], outlines[j][1]), i, j) for i in range(len(outlines))
                    for j in range(i + 1, len(outlines)) if outlines[i][0] != outlines[j][0]),
                   key=lambda t: (-t[0], t[1], t[2]))
    for score, i, j in pairs:
        if score < threshold or label[i] == label[j]:
            continue
        vols_i = {outlines[k][0] for k in range(len(outlines)) if label[k] == label[i]}
        vols_j = {outlines[k][0] for k in range(len(outlines)) if label[k] == label[j]}
        if vols_i & vols_j:
            continue
        old, new = max(label[i], label[j]), min(label[i], label[j])
        label = [new if lab == old else lab for lab in label]
    out = []
    for lab in sorted(set(label)):
        members = [outlines[k][1] for k in range(len(outlines)) if label[k] == lab]
        if len(members) < math.ceil(len(volunteers) / 2):
            continue
        votes = np.sum(members, axis=0)
        mask = votes >= math.ceil(len(members) / 2)
        out.append(mask if mask.any() else votes > 0)
    return out


def as_set(masks) -> set[bytes]:
    return {np.packbits(np.asarray(m, bool)).tobytes() for m in masks}


# --- parsing ------------------------------------------------------------------------------------

def test_reads_every_classification_and_polygon(classifications, by_image):
    assert len(classifications) == 763
    assert sum(len(c.polygons) for c in classifications) == 1251
    assert len({c.classification_id for c in classifications}) == 763
    zero = [c for c in classifications if c.n_peaks_answer == "0"]
    assert len(zero) == 57 and all(not c.polygons for c in zero)
    assert {c.scan for c in classifications} == SCANS
    assert len(by_image) == 488
    assert sum(len(v) > 1 for v in by_image.values()) == 273
    vertex_counts = [len(p) for c in classifications for p in c.polygons]
    assert min(vertex_counts) == 3 and max(vertex_counts) == 31
    assert all(p.shape[1] == 2 and p.dtype == np.float64 for c in classifications for p in c.polygons)
    # x is the column (0..487), y the row (0..195): the centroid medians of the README
    centres = np.array([p.mean(axis=0) for c in classifications for p in c.polygons])
    assert 200 < np.median(centres[:, 0]) < 330 and 60 < np.median(centres[:, 1]) < 140


def test_image_number_gives_scan_and_frame(classifications):
    first = next(c for c in classifications if c.classification_id == 501906814)
    assert (first.scan, first.frame, first.subject_id) == ("794673", 14, 90800803)
    assert first.n_peaks_answer == "2" and len(first.polygons) == 2
    assert first.user is None  # this export has no user column


# --- rasterising and clipping ---------------------------------------------------------------------

def test_rasterize_matches_pixel_centre_rule_including_past_the_edge(classifications):
    polys = [p for c in classifications for p in c.polygons]
    runs_past = [bool((p[:, 0] < 0).any() or (p[:, 0] > W).any() or (p[:, 1] < 0).any() or (p[:, 1] > H).any())
                 for p in polys]
    past_edge = [p for p, past in zip(polys, runs_past) if past]
    inside = [p for p, past in zip(polys, runs_past) if not past][::20]
    assert len(past_edge) == 58
    touching_border = n_differ = n_pixels = 0
    for k, poly in enumerate(past_edge + inside):
        got = rasterize_polygons([poly], (H, W))[0]
        # the reference on a window around the polygon (clipped to the frame), in frame coordinates
        c0, r0 = np.clip(np.floor(poly.min(axis=0)).astype(int) - 1, 0, [W, H])
        c1, r1 = np.clip(np.ceil(poly.max(axis=0)).astype(int) + 1, 0, [W, H])
        window = poly - [c0, r0]
        want = np.zeros((H, W), bool)
        want[r0:r1, c0:c1] = even_odd_reference(window, r1 - r0, c1 - c0)
        # pycocotools puts vertices on a 0.2 px grid: only pixel centres that close to the outline may differ
        differ = got != want
        near = np.zeros((H, W), bool)
        near[r0:r1, c0:c1] = distance_to_outline(window, r1 - r0, c1 - c0) < 0.25
        assert not (differ & ~near).any()
        n_differ += differ.sum()
        n_pixels += want.sum()
        assert got.any() == want.any()
        border = np.concatenate([got[0], got[-1], got[:, 0], got[:, -1]])
        touching_border += bool(border.any()) and k < len(past_edge)
    assert n_differ < 0.01 * n_pixels
    # a polygon cut by the frame edge fills the frame up to that edge
    assert touching_border >= 55


def test_clipping_by_hand():
    square = np.array([[-10.0, -10.0], [5.0, -10.0], [5.0, 4.0], [-10.0, 4.0]])
    corner = np.array([[480.0, 190.0], [600.0, 190.0], [600.0, 300.0], [480.0, 300.0]])
    outside = np.array([[-30.0, 10.0], [-5.0, 10.0], [-5.0, 40.0]])
    masks = rasterize_polygons([square, corner, outside], (H, W))
    assert masks.shape == (3, H, W) and masks.dtype == bool
    expected = np.zeros((3, H, W), bool)
    expected[0, 0:4, 0:5] = True  # centres 0.5..3.5 < 4 and 0.5..4.5 < 5
    expected[1, 190:, 480:] = True
    np.testing.assert_array_equal(masks, expected)


# --- consensus ----------------------------------------------------------------------------------

def test_consensus_by_hand():
    def box(r0, r1, c0, c1):
        m = np.zeros((1, 20, 20), bool)
        m[0, r0:r1, c0:c1] = True
        return m

    a, b, c = box(2, 10, 2, 10), box(3, 11, 2, 10), box(2, 10, 3, 11)
    lone = box(14, 18, 14, 18)
    nothing = np.zeros((0, 20, 20), bool)
    # three volunteers agree on one peak, one of them also drew a peak nobody else saw
    out = consensus_instances([np.concatenate([a, lone]), b, c])
    assert len(out) == 1
    votes = a[0].astype(int) + b[0] + c[0]
    np.testing.assert_array_equal(out[0], votes >= 2)
    # a "0 peaks" volunteer counts: 1 of 3 is not enough, 1 of 2 is
    assert len(consensus_instances([lone, nothing, nothing])) == 0
    np.testing.assert_array_equal(consensus_instances([lone, nothing]), lone)
    # two outlines of one peak by two volunteers merge to their union
    np.testing.assert_array_equal(consensus_instances([a, b])[0], a[0] | b[0])
    # one volunteer's two overlapping outlines are never merged with each other
    wide = box(2, 10, 2, 12)
    out = consensus_instances([np.concatenate([a, wide]), b])
    assert len(out) == 2
    # a single volunteer keeps exactly what they drew
    np.testing.assert_array_equal(consensus_instances([np.concatenate([a, lone])]), np.concatenate([a, lone]))


def test_every_image_appears_with_scan_file_and_frame(labels, by_image):
    assert len(labels) == 488
    assert {(fl.scan, fl.frame) for fl in labels} == {(s + ".nxs", f) for s, f in by_image}
    assert {fl.scan for fl in labels} == {s + ".nxs" for s in SCANS}
    assert all((fl.height, fl.width) == (H, W) for fl in labels)
    assert all((fl.reflection_ids == -1).all() for fl in labels)
    assert labels.root == CSV.parent
    zero_only = [k for k, v in by_image.items() if all(not c.polygons for c in v)]
    assert zero_only and all(len(fl) == 0 for fl in labels if (fl.scan[:-4], fl.frame) in zero_only)


def test_instance_counts_are_plausible(labels, by_image, classifications):
    n_polygons = sum(len(c.polygons) for c in classifications)
    assert 0.5 * n_polygons < labels.n_instances <= n_polygons
    for fl in labels:
        drawn = [len(c.polygons) for c in by_image[(fl.scan[:-4], fl.frame)]]
        if len(drawn) == 1:
            assert len(fl) == drawn[0]
        elif len(drawn) == 2:  # ceil(2/2) = 1: every peak either volunteer drew survives, matched ones merged
            assert max(drawn) <= len(fl) <= sum(drawn)
    every = zooniverse_to_labels(CSV, consensus="none")
    assert every.n_instances == n_polygons


def test_consensus_on_multi_labelled_images_follows_the_documented_rule(labels, by_image):
    result = {(fl.scan[:-4], fl.frame): fl for fl in labels}
    multi = sorted(k for k, v in by_image.items() if len(v) > 1)
    three = [k for k in multi if len(by_image[k]) == 3]
    assert len(three) == 2
    checked = three + multi[::9]
    for key in checked:
        volunteers = [rasterize_polygons(c.polygons, (H, W)) for c in by_image[key]]
        want = reference_consensus(volunteers)
        got = result[key].masks()
        assert as_set(got) == as_set(want), key
        for mask in got:  # every consensus pixel was marked by some volunteer
            assert (mask & np.concatenate(volunteers).any(axis=0)).sum() == mask.sum()
    # 794916-11: three volunteers, one outline each; only two overlap, so the third is outvoted
    volunteers = [rasterize_polygons(c.polygons, (H, W))[0] for c in by_image[("794916", 11)]]
    got = result[("794916", 11)].masks()
    assert len(got) == 1
    pair = max(((i, j) for i in range(3) for j in range(i + 1, 3)), key=lambda ij: iou(volunteers[ij[0]], volunteers[ij[1]]))
    np.testing.assert_array_equal(got[0], volunteers[pair[0]] | volunteers[pair[1]])


def test_round_trip_through_coco_json(tmp_path, labels):
    out = tmp_path / "zooniverse_labels.json"
    written = convert_zooniverse(CSV, out)
    assert written.root == tmp_path and written.n_instances == labels.n_instances
    back = read_coco(out)
    assert back.root == tmp_path
    assert [(fl.scan, fl.frame) for fl in back] == [(fl.scan, fl.frame) for fl in labels]
    for a, b in zip(back, labels):
        assert a.rles == b.rles
        np.testing.assert_array_equal(a.reflection_ids, b.reflection_ids)
    for a, b in list(zip(back, labels))[::25]:
        np.testing.assert_array_equal(a.masks(), b.masks())
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


# --- malformed exports ------------------------------------------------------------------------------

def _rows() -> tuple[list[str], list[dict]]:
    with CSV.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), [row for _, row in zip(range(3), reader)]


def _write(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("column, value, words", [
    ("annotations", '[{"task": "T3", "value": [{"points": [{"x": 1', ["not valid JSON"]),
    ("annotations", '[{"task": "T3", "value": [{"points": [{"x": "a", "y": 2}]}]}]', ["point"]),
    ("subject_data", '{"1": {"Image Number": "794673"}}', ["Image Number", "<scan>-<frame>"]),
    ("classification_id", "abc", ["not an integer"]),
])
def test_malformed_row_names_file_row_and_column(tmp_path, column, value, words):
    columns, rows = _rows()
    rows[1][column] = value
    bad = _write(tmp_path / "export.csv", columns, rows)
    with pytest.raises(LabelError) as info:
        read_zooniverse(bad)
    message = str(info.value)
    assert str(bad) in message and "row 3" in message and f"'{column}'" in message
    for word in words:
        assert word in message
    _write(bad, columns, _rows()[1])  # the same rows unbroken read fine
    assert len(read_zooniverse(bad)) == 3


def test_missing_column_and_missing_file(tmp_path):
    columns, rows = _rows()
    bad = _write(tmp_path / "export.csv", [c for c in columns if c != "annotations"],
                 [{k: v for k, v in r.items() if k != "annotations"} for r in rows])
    with pytest.raises(LabelError, match="annotations"):
        read_zooniverse(bad)
    with pytest.raises(LabelError, match="not found"):
        read_zooniverse(tmp_path / "nope.csv")
    with pytest.raises(UnknownNameError, match="majority"):
        zooniverse_to_labels(CSV, consensus="vote")
