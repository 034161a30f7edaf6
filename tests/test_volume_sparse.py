"""Label stacks held as their labelled pixels (:class:`dipid.volume.SparseFrames`, issue 14).

Everything made from the pixels alone equals what the dense label images give: the instance
label images (overlaps included), the per-voxel scores and sources, the 3D peak labels of the
linker and the peak table.
"""

from __future__ import annotations

import numpy as np
import pytest

from dipid.results import SOURCE_FLAGS, Instances
from dipid.volume import (
    PeakLinker,
    SparseFrames,
    _label_pixels,
    _score_pixels,
    _source_pixels,
    instance_label_frames,
    link_instances,
    peaks_table,
)

SHAPE = (40, 52)


def _random_instances(rng: np.random.Generator, n: int, shape=SHAPE) -> Instances:
    """``n`` blobby instances, some overlapping, with random scores and source flags."""
    masks = np.zeros((n, *shape), bool)
    for i in range(n):
        r, c = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        masks[i, r:r + rng.integers(2, 8), c:c + rng.integers(2, 8)] = True
        masks[i, r, c:c + 9] = True  # a tail, so boxes are not all filled
    flags = rng.choice(list(SOURCE_FLAGS.values()), n) | rng.choice([0, *SOURCE_FLAGS.values()], n)
    return Instances.from_masks(masks, rng.random(n).astype(np.float32), flags.astype(np.uint8))


def _dense(pixels: tuple[np.ndarray, np.ndarray], shape, dtype) -> np.ndarray:
    out = np.zeros(shape, dtype)
    out.reshape(-1)[pixels[0]] = pixels[1]
    return out


def _score_image(inst: Instances) -> np.ndarray:
    """The highest score of the instances covering each pixel (what peaks_table is given densely)."""
    out = np.zeros(inst.shape, np.float32)
    for (x0, y0, x1, y1), crop, score in zip(inst.boxes, inst.crops, inst.scores):
        region = out[y0:y1, x0:x1]
        np.maximum(region, np.where(crop, score, 0.0).astype(np.float32), out=region)
    return out


def _source_image(inst: Instances) -> np.ndarray:
    out = np.zeros(inst.shape, np.uint8)
    for (x0, y0, x1, y1), crop, flags in zip(inst.boxes, inst.crops, inst.sources):
        out[y0:y1, x0:x1][crop] |= np.uint8(flags)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_pixels_made_from_crops_equal_the_dense_images(seed):
    rng = np.random.default_rng(seed)
    inst = _random_instances(rng, 12)
    assert inst.union_mask().sum() < sum(int(c.sum()) for c in inst.crops), "the instances must overlap"
    for pixels, image in ((_label_pixels(inst), inst.label_image()), (_score_pixels(inst), _score_image(inst)),
                          (_source_pixels(inst), _source_image(inst))):
        flat, values = pixels
        assert np.all(np.diff(flat) > 0) and np.all(values != 0)
        np.testing.assert_array_equal(_dense(pixels, SHAPE, image.dtype), image)
    empty = Instances.empty(SHAPE)
    assert _label_pixels(empty)[0].size == _score_pixels(empty)[0].size == 0


def test_sparse_frames_behave_as_the_dense_stack():
    rng = np.random.default_rng(5)
    per_frame = [_random_instances(rng, n) for n in (3, 0, 5)]
    made = []

    def pixels(k):
        made.append(k)
        return _label_pixels(per_frame[k])

    dense = np.stack([inst.label_image() for inst in per_frame])
    for keep in (False, True):
        made.clear()
        stack = SparseFrames(pixels, 3, SHAPE, np.int32, keep=keep)
        assert stack.shape == dense.shape and stack.dtype == np.int32
        np.testing.assert_array_equal(np.asarray(stack), dense)
        np.testing.assert_array_equal(stack[-1], dense[2])
        assert stack.max() == dense.max() and stack.max(initial=100) == 100
        flat = np.arange(SHAPE[0] * SHAPE[1])
        np.testing.assert_array_equal(stack.at(0, flat), dense[0].ravel())
        before = made.count(0)
        stack.pixels(0)
        assert made.count(0) == before + (0 if keep else 1)
        with pytest.raises(IndexError):
            stack.pixels(3)
    np.testing.assert_array_equal(np.asarray(instance_label_frames(per_frame, SHAPE)), dense)


def _drifting_scan(rng: np.random.Generator, n_frames: int) -> list[Instances]:
    """Peaks that move a pixel a frame (so they link), plus noise instances."""
    per_frame = []
    for k in range(n_frames):
        masks = np.zeros((6, *SHAPE), bool)
        for i, (r, c) in enumerate([(5, 5), (20, 30), (30, 8)]):
            masks[i, r + k // 2:r + k // 2 + 5, c:c + 6] = True
        for i in range(3, 6):
            r, c = rng.integers(0, SHAPE[0] - 3), rng.integers(0, SHAPE[1] - 3)
            masks[i, r:r + 3, c:c + 3] = True
        per_frame.append(Instances.from_masks(masks, rng.random(6).astype(np.float32), SOURCE_FLAGS["classical"]))
    return per_frame


def test_linking_instances_by_their_pixels_equals_linking_their_label_images():
    rng = np.random.default_rng(6)
    per_frame = _drifting_scan(rng, 7)
    frame_numbers = np.array([0, 1, 2, 4, 5, 6, 9])
    for min_frames in (1, 2, 3):
        dense = PeakLinker()
        for inst, frame in zip(per_frame, frame_numbers):
            dense.add(inst.label_image(), int(frame))
        dense.finish(min_frames=min_frames)
        expected = np.asarray(dense.peak_labels(lambda k: per_frame[k].label_image(), SHAPE))
        linked = link_instances(per_frame, frame_numbers, SHAPE, min_frames=min_frames)
        assert isinstance(linked, SparseFrames) and linked.max() == dense.n_peaks
        np.testing.assert_array_equal(np.asarray(linked), expected)
        assert expected.max() > 0


def test_add_pixels_checks_its_input():
    linker = PeakLinker()
    with pytest.raises(ValueError, match="negative"):
        linker.add_pixels(np.array([3, 4]), np.array([1, -1]), SHAPE)
    linker.add_pixels(np.array([3, 4]), np.array([1, 1]), SHAPE, 5)
    with pytest.raises(ValueError, match="ascending"):
        linker.add_pixels(np.array([3]), np.array([1]), SHAPE, 5)
    linker.finish()
    with pytest.raises(RuntimeError):
        linker.add_pixels(np.array([3]), np.array([1]), SHAPE, 6)


def test_the_peak_table_from_pixels_equals_the_table_from_dense_volumes():
    rng = np.random.default_rng(7)
    per_frame = _drifting_scan(rng, 6)
    n = len(per_frame)
    counts = rng.poisson(5.0, (n, *SHAPE)).astype(np.float32) + 50 * np.stack(
        [inst.union_mask() for inst in per_frame])
    counts[2, 20:26, 28:40] = np.nan  # unmeasured pixels count as bad
    bad = rng.random((n, *SHAPE)) < 0.05
    labels = link_instances(per_frame, np.arange(n), SHAPE, min_frames=2)
    dense = np.asarray(labels)
    expected = peaks_table(dense, counts, scores=np.stack([_score_image(i) for i in per_frame]),
                           sources=np.stack([_source_image(i) for i in per_frame]), bad_pixels=bad,
                           axis_values=np.linspace(1, 2, n), axis_name="eta")
    got = peaks_table(labels, counts,
                      scores=SparseFrames(lambda k: _score_pixels(per_frame[k]), n, SHAPE, np.float32),
                      sources=SparseFrames(lambda k: _source_pixels(per_frame[k]), n, SHAPE, np.uint8),
                      bad_pixels=lambda k: bad[k], axis_values=np.linspace(1, 2, n), axis_name="eta")
    assert list(got) == list(expected) and len(got["id"]) >= 3
    for name in expected:
        if name == "models":
            assert got[name] == expected[name]
        else:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_the_peak_table_uses_the_frame_level_where_a_ring_is_empty():
    labels = np.zeros((2, 12, 12), np.int32)
    labels[:, 2:10, 2:10] = 2
    labels[:, 4:8, 4:8] = 1  # peak 1's ring is all of peak 2
    counts = np.full((2, 12, 12), 3.0, np.float32)
    counts[:, 0, :] = 7.0
    sparse = SparseFrames(lambda k: (np.flatnonzero(labels[k]), labels[k].ravel()[labels[k].ravel() > 0]),
                          2, (12, 12), np.int32)
    expected = peaks_table(labels, counts)
    got = peaks_table(sparse, counts)
    for name in expected:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]), err_msg=name)
    assert got["background"][0] == np.median(counts[0][labels[0] == 0])  # the frame's peak-free median
