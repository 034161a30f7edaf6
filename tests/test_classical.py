"""Tests of the classical peak finder on hand-made Pilatus-sized frames."""

from __future__ import annotations

import numpy as np
import pytest

from dipid.classical import (
    Background,
    ClassicalConfig,
    ClassicalFinder,
    ClassicalResult,
    estimate_background,
    find_peaks_classical,
    significance_to_score,
)
from dipid.postprocess import masks_to_boxes

H, W = 195, 487  # Pilatus 100K
ROWS, COLS = np.mgrid[:H, :W]

# (row, col, gaussian sigma in px, amplitude in units of sqrt(background)); weak to strong
BLOBS = [(40, 60, 2.0, 12.0), (150, 120, 3.0, 6.0), (100, 250, 6.0, 5.0), (60, 400, 1.5, 40.0), (160, 330, 10.0, 8.0)]


def blob_image(blobs, level: np.ndarray | float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Noise-free peak signal and each blob's true extent (signal >= 2 sqrt(background))."""
    noise = np.sqrt(np.maximum(level, 1.0))
    signal = np.zeros((H, W))
    truths = []
    for row, col, width, amplitude in blobs:
        g = amplitude * noise * np.exp(-((ROWS - row) ** 2 + (COLS - col) ** 2) / (2 * width**2))
        signal += g
        truths.append(g >= 2 * noise)
    return signal, truths


def make_frame(seed: int, level: np.ndarray | float = 4.0, blobs=BLOBS) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    signal, truths = blob_image(blobs, level)
    frame = rng.poisson(np.broadcast_to(level, (H, W)) + signal).astype(np.int32)
    return frame, truths


def best_iou(masks: np.ndarray, truth: np.ndarray) -> float:
    return max((np.count_nonzero(m & truth) / np.count_nonzero(m | truth) for m in masks), default=0.0)


def assert_finds_each_blob_once(result: ClassicalResult, truths: list[np.ndarray], blobs=BLOBS, min_iou: float = 0.5):
    assert len(result) == len(blobs), f"found {len(result)} peaks for {len(blobs)} blobs"
    for (row, col, *_), truth in zip(blobs, truths):
        covering = [k for k, m in enumerate(result.masks) if m[row, col]]
        assert len(covering) == 1, f"blob at ({row}, {col}) covered by {len(covering)} peaks"
        # masks follow the true extent, not just the bright core
        assert best_iou(result.masks, truth) >= min_iou, f"blob at ({row}, {col}) IoU {best_iou(result.masks, truth):.2f}"


# --- background ----------------------------------------------------------------------------------

INTERIOR = (slice(8, -8), slice(8, -8))  # half a cell in from the edges, where nothing is extrapolated


def assert_background_close(background: np.ndarray, level: np.ndarray | float, *, relative: float | None):
    level = np.broadcast_to(level, background.shape)
    # everywhere, edges included, the error is small against the noise the detection works with
    assert np.max(np.abs(background - level) / np.sqrt(np.maximum(level, 1))) < 0.5
    assert abs(background.mean() / level.mean() - 1) < 0.03
    if relative is not None:
        assert np.max(np.abs(background / level - 1)[INTERIOR]) < relative


@pytest.mark.parametrize("level", [1.5, 4.0, 50.0])
def test_background_of_flat_frame(level):
    frame, _ = make_frame(1, level)
    background, sigma = estimate_background(frame)
    assert background.shape == (H, W) and background.dtype == np.float32 and sigma.dtype == np.float32
    # Within 10 % of the true level, also under the peaks, where counts allow: at 1.5 counts a
    # 16 x 16 cell's mean itself scatters by 5 %. (A median of integer counts would say 1 or 2.)
    assert_background_close(background, level, relative=0.10 if level >= 4 else None)
    assert np.abs(sigma / np.sqrt(max(level, 1.0)) - 1).max() < 0.15


def test_background_follows_a_gradient():
    level = 2.0 + 0.03 * COLS + 0.02 * ROWS  # 2 .. 20.5 counts
    frame, _ = make_frame(2, level)
    assert_background_close(estimate_background(frame).background, level, relative=0.10)


def test_background_ignores_bad_pixels():
    frame, _ = make_frame(3, 4.0, blobs=[])
    bad = np.zeros((H, W), bool)
    bad[:, 200:260] = True           # a 60-column stripe of hot pixels
    frame[bad] = 100_000
    frame[10:20, 10:20] = -2         # Pilatus marks dead pixels negative
    background, sigma = estimate_background(frame, bad_pixels=bad)
    assert_background_close(background, 4.0, relative=0.10)
    assert sigma.max() < 2.5
    # without the mask the stripe is taken for background
    assert estimate_background(frame).background[:, 230].min() > 1000


def test_background_is_a_named_pair_and_survives_an_all_bad_frame():
    frame = np.full((H, W), -1, np.int32)
    est = estimate_background(frame)
    assert isinstance(est, Background)
    np.testing.assert_array_equal(est.background, 0)
    assert np.all(est.sigma >= 1)


# --- peaks ---------------------------------------------------------------------------------------

def test_finds_every_blob_on_flat_background():
    frame, truths = make_frame(4, 4.0)
    result = find_peaks_classical(frame)
    assert_finds_each_blob_once(result, truths)
    assert result.masks.dtype == bool and result.masks.shape == (len(BLOBS), H, W)
    np.testing.assert_array_equal(result.boxes, masks_to_boxes(result.masks))
    assert np.all(np.diff(result.scores) <= 0)  # sorted by score


def test_finds_every_blob_on_gradient_without_false_peaks():
    level = 1.0 + 0.04 * COLS  # 1 .. 20.5 counts across the detector
    frame, truths = make_frame(5, level)
    assert_finds_each_blob_once(find_peaks_classical(frame), truths)


def test_scores_are_in_unit_range_and_follow_significance():
    frame, _ = make_frame(6, 4.0)
    result = find_peaks_classical(frame)
    assert np.all((result.scores >= 0) & (result.scores < 1))
    np.testing.assert_array_equal(np.argsort(-result.scores, kind="stable"), np.argsort(-result.significance, kind="stable"))
    strongest = [k for k, m in enumerate(result.masks) if m[60, 400]][0]  # amplitude 40
    weakest = [k for k, m in enumerate(result.masks) if m[100, 250]][0]   # amplitude 5
    assert result.scores[strongest] > result.scores[weakest]


def test_significance_to_score_values():
    np.testing.assert_allclose(significance_to_score(np.array([0.0, 3.0, 6.0, -1.0])), [0.0, 0.5, 0.75, 0.0])
    assert significance_to_score(np.array([100.0]))[0] <= 1.0


def test_bad_pixel_stripe_is_never_found_nor_part_of_a_peak():
    blobs = [(100, 230, 4.0, 10.0), (50, 60, 2.0, 12.0)]  # the first straddles the stripe
    frame, truths = make_frame(7, 4.0, blobs)
    bad = np.zeros((H, W), bool)
    bad[:, 228:232] = True
    frame[bad] = 900_000
    result = find_peaks_classical(frame, bad_pixels=bad)
    assert not (result.masks & bad).any()
    assert not result.masks[:, :, 228:232].any()
    # The stripe cuts the first blob in two; both halves and the second blob are found.
    covered = result.masks.any(axis=0)
    assert covered[100, 226] and covered[100, 234] and covered[50, 60]
    assert 2 <= len(result) <= 3
    # Not flagged, the stripe is (correctly, from the data alone) a peak.
    unflagged = find_peaks_classical(frame)
    assert any(m[:, 230].sum() > 100 for m in unflagged.masks)


def test_negative_pixels_are_bad_without_a_mask():
    frame, _ = make_frame(8, 4.0, blobs=[(100, 200, 3.0, 10.0)])
    frame[99:102, 199:202] = -1  # dead pixels in the middle of the peak
    result = find_peaks_classical(frame)
    assert len(result) == 1
    assert not result.masks[0][99:102, 199:202].any()
    assert result.masks[0][100, 197] and result.masks[0][100, 203]


def test_saturated_peak_centre_is_found_and_isolated_hot_pixel_is_not():
    blobs = [(100, 200, 3.0, 20.0)]
    frame, truths = make_frame(9, 4.0, blobs)
    frame[100, 200] = 1_000_000      # saturated Pilatus pixel at the peak centre
    frame[30, 400] = 1_000_000       # a lone hot pixel nobody flagged
    result = find_peaks_classical(frame)
    assert len(result) == 1
    assert result.masks[0][100, 200]
    assert best_iou(result.masks, truths[0]) > 0.5
    assert not any(m[30, 400] for m in result.masks)


def test_pure_noise_gives_no_peaks_at_5_sigma():
    finder = ClassicalFinder(k_sigma=5.0)
    rng = np.random.default_rng(10)
    frames = np.stack([rng.poisson(level, (H, W)) for level in (0.3, 1.0, 3.0, 20.0, 200.0)]).astype(np.int32)
    results = finder(frames)
    assert sum(len(r) for r in results) == 0
    # the default 3-sigma seeds stay quiet on noise too (the box average damps single pixels)
    assert sum(len(r) for r in ClassicalFinder()(frames)) <= 1


def test_grow_sigma_controls_mask_size():
    frame, truths = make_frame(11, 4.0, blobs=[(100, 200, 5.0, 10.0)])
    grown = find_peaks_classical(frame, grow_sigma=2.0)
    seeds_only = find_peaks_classical(frame, grow_sigma=None)
    assert grown.masks.sum() > seeds_only.masks.sum()
    assert best_iou(grown.masks, truths[0]) > best_iou(seeds_only.masks, truths[0])


def test_large_peak_does_not_lift_the_background_under_itself():
    frame, truths = make_frame(12, 4.0, blobs=[(100, 240, 14.0, 30.0)])  # ~4000 px above 2 sigma
    one_pass = find_peaks_classical(frame, background_passes=1)
    two_pass = find_peaks_classical(frame)
    # The first pass takes part of the peak for background; the second, without the peak, much less.
    assert one_pass.background[100, 240] > 2 * 4.0
    assert two_pass.background[100, 240] < 1.5 * 4.0
    assert best_iou(two_pass.masks, truths[0]) > 0.85
    assert best_iou(two_pass.masks, truths[0]) > best_iou(one_pass.masks, truths[0])


# --- the model-like wrapper -----------------------------------------------------------------------

def test_classical_finder_batches_and_config():
    frames = np.stack([make_frame(s, 4.0)[0] for s in (13, 14)])
    bad = np.zeros((H, W), bool)
    bad[:, 300:302] = True
    finder = ClassicalFinder()
    assert finder.name == "classical" and finder.config == ClassicalConfig()
    results = finder(frames, bad)
    assert len(results) == 2 and all(isinstance(r, ClassicalResult) for r in results)
    single = find_peaks_classical(frames[1], bad_pixels=bad)
    np.testing.assert_array_equal(results[1].masks, single.masks)
    np.testing.assert_array_equal(results[1].scores, single.scores)
    per_frame_bad = np.stack([bad, np.zeros_like(bad)])
    assert len(finder(frames, per_frame_bad)) == 2
    assert len(finder(frames[0])) == 1  # a single (H, W) frame
    strict = ClassicalFinder(ClassicalConfig(min_area=10_000))
    assert sum(len(r) for r in strict(frames)) == 0
    with pytest.raises(TypeError):
        ClassicalFinder(k_sgima=4)
    with pytest.raises(ValueError):
        finder(frames, bad[:100])


def test_window_sizes_must_be_odd():
    frame, _ = make_frame(15, 4.0, blobs=[])
    with pytest.raises(ValueError, match="smooth"):
        find_peaks_classical(frame, smooth=2)
    with pytest.raises(ValueError, match="smooth_cells"):
        estimate_background(frame, smooth_cells=4)
    with pytest.raises(ValueError):
        estimate_background(frame[0])  # not (H, W)


def test_frame_smaller_than_a_cell():
    rng = np.random.default_rng(16)
    frame = rng.poisson(3.0, (10, 12)).astype(np.int32)
    frame[4:7, 4:7] += 60
    result = find_peaks_classical(frame)
    assert len(result) == 1
    assert result.masks[0][4:7, 4:7].all() and result.masks[0].sum() < 40
    # left with 10 pixels once the peak is excluded, the background still comes from them
    assert 2.0 < result.background.mean() < 4.0
