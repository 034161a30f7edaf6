"""The fast paths of `dipid predict` (issue 14) write what the plain paths write.

Frames kept between passes or read again, read one at a time or in batches; label volumes written
from their labelled pixels or from dense frames; outlines and 3D voxels drawn from pixels or from
images: the peak table, the results file (to its stored chunks) and the viewer page are the same.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from dipid import pipeline
from dipid.io.results_nexus import _write_volume, write_results_nexus
from dipid.pipeline import PredictOptions, output_paths, process_scan
from dipid.results import SOURCE_FLAGS, Instances
from dipid.synth import simulate_scan
from dipid.volume import SparseFrames, _label_pixels, instance_label_frames, scan_peaks

_VARYING = {"file_time", "start_time", "date", "file_name"}  # time stamps and the file's own name


def _nexus_content(path: Path) -> dict:
    """Every member's attributes and values (time stamps and file name left out) and every stored chunk, as stored."""
    content = {}
    with h5py.File(path, "r") as h5:
        def visit(name, obj):
            attrs = {k: np.asarray(v).tolist() for k, v in obj.attrs.items() if k not in _VARYING}
            entry = {"attrs": attrs}
            if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] not in _VARYING:
                entry["value"] = np.asarray(obj[()]).tolist()
                if obj.chunks is not None:
                    entry["chunks"] = [(info.chunk_offset, obj.id.read_direct_chunk(info.chunk_offset)[1])
                                       for info in map(obj.id.get_chunk_info, range(obj.id.get_num_chunks()))]
            content[name] = entry
        h5.visititems(visit)
        content["/"] = {k: np.asarray(v).tolist() for k, v in h5.attrs.items() if k not in _VARYING}
    return content


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scan")
    return simulate_scan(n_frames=9, preset="realistic", seed=4).write(folder, "scan").nexus


def test_outputs_do_not_depend_on_kept_frames_or_read_batches(scan, tmp_path, monkeypatch):
    options = PredictOptions(model="classical", device="cpu", batch_size=4)
    outputs = []
    for cache, read_bytes in ((pipeline.SCAN_CACHE_BYTES, pipeline.READ_BYTES), (0, 1), (1 << 30, 1)):
        monkeypatch.setattr(pipeline, "SCAN_CACHE_BYTES", cache)
        monkeypatch.setattr(pipeline, "READ_BYTES", read_bytes)
        out = tmp_path / f"out_{cache}_{read_bytes}"
        summary = process_scan(scan, out, options)
        assert summary.status == "done" and summary.peaks > 0, summary.error
        outputs.append(output_paths(scan, out))
    first = outputs[0]
    for other in outputs[1:]:
        assert other["peaks"].read_bytes() == first["peaks"].read_bytes()
        assert other["viewer"].read_bytes() == first["viewer"].read_bytes()
        assert _nexus_content(other["nexus"]) == _nexus_content(first["nexus"])


def test_results_file_from_labelled_pixels_equals_the_one_from_dense_frames(scan, tmp_path):
    from dipid.predict import JointPredictor

    result = JointPredictor(device="cpu").predict_scan(scan, models="classical")
    peaks = scan_peaks(result, model="classical", min_frames=2)
    assert isinstance(peaks.label_frames, SparseFrames)
    sparse = {m: instance_label_frames(result.instances(m), result.frame_shape) for m in result.models_present()}
    assert set(sparse) == {"classical", "joint"}
    write_results_nexus(tmp_path / "sparse.nxs", result, peaks=peaks, label_frames=sparse)
    dense_peaks = type(peaks)(**{**peaks.__dict__, "label_frames": peaks.labels})
    write_results_nexus(tmp_path / "dense.nxs", result, peaks=dense_peaks)
    assert _nexus_content(tmp_path / "sparse.nxs") == _nexus_content(tmp_path / "dense.nxs")


def test_viewer_from_labelled_pixels_equals_the_one_from_dense_frames(scan, tmp_path):
    from dipid.predict import JointPredictor
    from dipid.viz import view_scan_result

    result = JointPredictor(device="cpu").predict_scan(scan, models="classical")
    peaks = scan_peaks(result, model="classical", min_frames=2)
    from dipid.io import open_scan

    with open_scan(scan) as opened:
        view_scan_result(result, opened, tmp_path / "sparse.html", peak_table=peaks)
        dense = {m: result.label_frames(m) for m in result.models_present()}
        view_scan_result(result, opened, tmp_path / "dense.html", peak_table=peaks.table,
                         peak_label_volume=peaks.labels, label_volumes=dense)
    assert (tmp_path / "sparse.html").read_bytes() == (tmp_path / "dense.html").read_bytes()


def _instances(rng: np.random.Generator, shape: tuple[int, int], n: int) -> Instances:
    masks = np.zeros((n, *shape), bool)
    for i in range(n):
        r, c = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        masks[i, r:r + rng.integers(1, 6), c:c + rng.integers(1, 6)] = True
        masks[i, r + 2, c:c + 7] = True
    return Instances.from_masks(masks, rng.random(n), SOURCE_FLAGS["classical"])


def test_outlines_and_surface_from_pixels_equal_those_from_images():
    from dipid.viz.geometry import (
        _sparse_surface,
        _surface_pixels,
        _surface_sample,
        label_outlines,
    )

    rng = np.random.default_rng(8)
    shape = (30, 40)
    per_frame = [_instances(rng, shape, n) for n in (6, 0, 9, 4)]
    stack = instance_label_frames(per_frame, shape)
    dense = np.asarray(stack)
    for k in range(len(per_frame)):
        sparse_outlines, dense_outlines = label_outlines(stack.pixels(k), shape), label_outlines(dense[k])
        assert [(o.label, o.area, o.box) for o in sparse_outlines] == [(o.label, o.area, o.box) for o in dense_outlines]
        for a, b in zip(sparse_outlines, dense_outlines):
            np.testing.assert_array_equal(a.x, b.x)
            np.testing.assert_array_equal(a.y, b.y)
        before = None if k == 0 else k - 1
        after = None if k == len(per_frame) - 1 else k + 1
        rows, cols, ids = _sparse_surface(None if before is None else stack.pixels(before), stack.pixels(k),
                                          None if after is None else stack.pixels(after), shape)
        expected = _surface_pixels(None if before is None else dense[before], dense[k],
                                   None if after is None else dense[after])
        np.testing.assert_array_equal(np.stack([rows, cols]), np.stack(expected))
        np.testing.assert_array_equal(ids, dense[k][expected])
    for max_voxels in (10**6, 25):
        for a, b in zip(_surface_sample(stack, max_voxels), _surface_sample(dense, max_voxels)):
            np.testing.assert_array_equal(a, b)


def test_label_volume_chunks_from_pixels_equal_those_from_dense_frames(tmp_path):
    rng = np.random.default_rng(9)
    shape = (300, 270)  # 3 x 3 chunks of 128, the last row and column partial
    per_frame = [_instances(rng, shape, n) for n in (0, 5, 40)]
    corner = np.zeros((1, *shape), bool)
    corner[0, 290:300, 260:270] = True  # in the (partial) corner chunk
    per_frame.append(Instances.from_masks(corner, [0.5], SOURCE_FLAGS["classical"]))
    stack = instance_label_frames(per_frame, shape)
    with h5py.File(tmp_path / "v.h5", "w") as h5:
        chunks: list = []
        _write_volume(h5, "sparse", stack, np.uint16, chunks_out=chunks)
        _write_volume(h5, "dense", np.asarray(stack), np.uint16)
        # a volume equal to the one before in some frames reuses its compressed chunks there
        other = [per_frame[0], _instances(rng, shape, 3), per_frame[2], per_frame[3]]
        _write_volume(h5, "like", instance_label_frames(other, shape), np.uint16, like=(stack, chunks))
    content = _nexus_content(tmp_path / "v.h5")
    assert content["sparse"] == content["dense"]
    np.testing.assert_array_equal(content["like"]["value"], np.stack([inst.label_image() for inst in other]))
    for k in (0, 2, 3):
        assert [c for c in content["like"]["chunks"] if c[0][0] == k] == \
            [c for c in content["sparse"]["chunks"] if c[0][0] == k]


def test_label_pixels_of_an_empty_frame_keep_its_first_chunk(tmp_path):
    stack = SparseFrames(lambda k: _label_pixels(Instances.empty((20, 30))), 2, (20, 30), np.int32)
    with h5py.File(tmp_path / "e.h5", "w") as h5:
        dataset = _write_volume(h5, "labels", stack)
        assert dataset.id.get_num_chunks() == 2  # every frame has storage
        assert not dataset[()].any()
