"""Tests of the classical peak finder: hand-made Pilatus-sized frames, and the fast finder against the
plain full-frame formulas on simulated and random frames."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy import ndimage

from dipid.classical import (
    Background,
    ClassicalConfig,
    ClassicalFinder,
    ClassicalResult,
    _background_from_grid,
    _cell_statistics,
    _CellGrid,
    _components,
    _median_deviation,
    _PixelState,
    _smooth_grid,
    _sorted_median,
    _valid_pixels,
    candidate_thresholds,
    estimate_background,
    find_peaks_classical,
    significance_to_score,
)
from dipid.io.pixels import bad_pixels as find_bad_pixels
from dipid.io.pixels import fill_bad_pixels
from dipid.postprocess import masks_to_boxes
from dipid.synth import simulate_scan

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


# --- the fast finder gives the masks of the plain full-frame formulas ------------------------------
#
# The references below are the straightforward implementations the fast code replaces: every cell
# sorted twice, the excess and snr of every pixel, scipy's labelling of the whole frame.

def reference_cell_statistics(values: np.ndarray, clip_sigma: float = 3.0):
    """Level, spread and valid count of each row: sort, median, sorted |deviations|, clipped moments."""
    values = np.sort(values, axis=-1)
    n_valid = np.count_nonzero(~np.isnan(values), axis=-1)
    median = _sorted_median(values, n_valid)
    deviations = np.sort(np.abs(values - median[..., None]), axis=-1)
    mad_sigma = 1.4826 * _sorted_median(deviations, n_valid)
    clip = median + clip_sigma * np.maximum.reduce([np.sqrt(np.maximum(median, 0)), mad_sigma, np.ones_like(median)])
    inside = values <= clip[..., None]
    n_inside = np.maximum(np.count_nonzero(inside, axis=-1), 1)
    offsets = np.where(inside, values - median[..., None], 0.0)
    mean_offset = offsets.sum(axis=-1, dtype=np.float64) / n_inside
    mean_square = np.square(offsets).sum(axis=-1, dtype=np.float64) / n_inside
    return median + mean_offset, np.sqrt(np.maximum(mean_square - mean_offset * mean_offset, 0.0)), n_valid


def random_cells(rng, rows: int = 400, width: int = 256, *, scaled: bool = False) -> np.ndarray:
    """Cells of Poisson counts from 0.2 to 1e5 counts, some with peaks, some partly or wholly invalid."""
    level = rng.choice([0.2, 1.0, 3.0, 20.0, 300.0, 1e5], rows)
    values = rng.poisson(level[:, None], (rows, width)).astype(np.float32)
    peaky = rng.random(rows) < 0.3
    values[peaky, : width // 5] += rng.poisson(50 * np.sqrt(level[peaky, None]) + 5, (peaky.sum(), width // 5))
    if scaled:  # a frame divided by an attenuator transmission: not integers
        values *= np.float32(1 / 0.37)
    n_valid = np.where(rng.random(rows) < 0.3, rng.integers(0, width + 1, rows), width)
    values[np.arange(width)[None, :] >= n_valid[:, None]] = np.nan
    return rng.permuted(values, axis=1)  # invalid pixels anywhere in the cell


@pytest.mark.parametrize("scaled", [False, True])
def test_cell_statistics_equal_the_sort_based_reference(scaled):
    rng = np.random.default_rng(20)
    values = random_cells(rng, scaled=scaled)
    level, spread, n_valid = _cell_statistics(values, 3.0)
    ref_level, ref_spread, ref_n = reference_cell_statistics(values)
    np.testing.assert_array_equal(n_valid, ref_n)
    has = ref_n > 0  # cells without a valid pixel have no statistics (they are filled from neighbours)
    np.testing.assert_array_equal(level[has], ref_level[has])
    np.testing.assert_array_equal(spread[has], ref_spread[has])
    # the input was left alone, and overwriting it (with known counts) gives the same
    again = _cell_statistics(values.copy(), 3.0, n_valid=ref_n, overwrite=True)
    np.testing.assert_array_equal(again[0][has], level[has])


def test_median_deviation_equals_sorting_the_deviations():
    rng = np.random.default_rng(21)
    for width in (1, 2, 3, 7, 16, 64, 256):
        values = rng.poisson(rng.choice([0.3, 2.0, 30.0]), (300, width)).astype(np.float32)  # many ties
        n = rng.integers(0, width + 1, 300)
        values[np.arange(width)[None, :] >= n[:, None]] = np.nan
        values.sort(axis=-1)
        median = _sorted_median(values, n)
        expected = _sorted_median(np.sort(np.abs(values - median[:, None]), axis=-1), n)
        got = _median_deviation(values, median, n)
        np.testing.assert_array_equal(got[n > 0], expected[n > 0])
        assert np.isnan(got[n == 0]).all()


def reference_median_filter(grid: np.ndarray, size: int) -> np.ndarray:
    pad = size // 2
    if min(grid.shape) > 1:
        padded = np.pad(grid, pad, mode="reflect", reflect_type="odd")
    else:
        padded = np.pad(grid, pad, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size)).reshape(*grid.shape, size * size)
    return np.partition(windows, size * size // 2, axis=-1)[..., size * size // 2].astype(np.float32)


def test_grid_median_filter_and_its_partial_update_equal_a_float64_median_filter():
    rng = np.random.default_rng(22)
    level = rng.gamma(3.0, 10.0, (13, 17))
    spread = rng.gamma(2.0, 1.0, (13, 17))
    n_valid = np.full((13, 17), 256)
    n_valid[5, 2:9] = 0  # a module gap: cells filled from their neighbours
    options = dict(shape=(13 * 16, 17 * 16), cell=16, smooth_cells=5, clip_sigma=3.0, whole_frame=None)
    first = _smooth_grid(level, spread, n_valid, **options)
    filled = ndimage.distance_transform_edt(n_valid < 32, return_indices=True)[1]
    np.testing.assert_array_equal(first.level, reference_median_filter(level[filled[0], filled[1]], 5))
    level2, spread2 = level.copy(), spread.copy()
    level2[0, 0] *= 3  # a corner (its point reflections change too) and an inner cell
    level2[7, 9] += 40
    spread2[12, 16] = 0.5
    second = _smooth_grid(level2, spread2, n_valid, previous=first, **options)
    np.testing.assert_array_equal(second.level, reference_median_filter(level2[filled[0], filled[1]], 5))
    np.testing.assert_array_equal(second.spread, reference_median_filter(spread2[filled[0], filled[1]], 5))


def test_candidate_thresholds_never_exceed_the_real_threshold():
    """No pixel below its cell's threshold can reach snr >= grow_level: the screen loses nothing."""
    rng = np.random.default_rng(23)
    for shape, cell, smooth in [((195, 487), 16, 3), ((100, 130), 8, 5), ((37, 300), 16, 1), ((10, 12), 16, 3)]:
        grid_shape = (-(-shape[0] // cell), -(-shape[1] // cell))
        rows, cols = np.mgrid[:grid_shape[0], :grid_shape[1]]
        # steep gradients (the edges extrapolate below zero), bumps and noise
        level = (50 - 9 * rows + 3 * cols + rng.gamma(2.0, 5.0, grid_shape)).astype(np.float32)
        spread = rng.gamma(2.0, 2.0, grid_shape).astype(np.float32)
        background, sigma = _background_from_grid(_CellGrid(level, spread, shape, cell))
        real = background + 2.0 * sigma  # what the box mean of counts has to reach
        lowest = ndimage.minimum_filter(real, size=smooth, mode="nearest")  # over each pixel's box
        thresholds = candidate_thresholds(level, spread, shape, cell=cell, smooth=smooth, grow_level=2.0)
        block = grid_shape[0] * cell // thresholds.shape[0]  # blocks of pixels tiling the padded frame
        assert block in (cell, cell // 2) and thresholds.shape[1] * block == grid_shape[1] * cell
        top, left = (grid_shape[0] * cell - shape[0]) // 2, (grid_shape[1] * cell - shape[1]) // 2
        per_pixel = np.repeat(np.repeat(thresholds, block, 0), block, 1)[top:top + shape[0], left:left + shape[1]]
        assert np.all(per_pixel <= lowest)
    # On a flat background the bound is the threshold itself (less the float32 slack): nothing is screened in for free.
    level, spread = np.full((13, 31), 9.0, np.float32), np.full((13, 31), 2.0, np.float32)
    thresholds = candidate_thresholds(level, spread, (195, 487), cell=16, smooth=3, grow_level=2.0)
    np.testing.assert_allclose(thresholds, 9.0 + 2.0 * 3.0, rtol=2e-4)
    # On a steep ramp (20 counts a cell) the blocks' bounds follow it: they lag by about the change
    # over a block and a box (9 pixels of 1.25 counts), not over the three cells around them.
    level = np.broadcast_to(np.float32(5.0) + 20 * np.arange(13, dtype=np.float32)[:, None], (13, 31))
    background, sigma = _background_from_grid(_CellGrid(level, spread, (195, 487), 16))
    thresholds = candidate_thresholds(level, spread, (195, 487), cell=16, smooth=3, grow_level=2.0)
    per_pixel = np.repeat(np.repeat(thresholds, 8, 0), 8, 1)[5:200, 4:491]  # 208 x 496 padded, 5 / 4 before
    assert np.all(per_pixel <= background + 2 * sigma)
    assert np.median(background + 2 * sigma - per_pixel) < 9 * 20 / 16


def _box_sum(values: np.ndarray, size: int) -> np.ndarray:
    """The full-frame box sum the finder reproduces: zero padding, rows then columns, in this order."""
    radius, (h, w) = size // 2, values.shape
    padded = np.pad(values, radius)
    rows = padded[0:h].copy()
    for k in range(1, size):
        rows += padded[k:k + h]
    out = rows[:, 0:w].copy()
    for k in range(1, size):
        out += rows[:, k:k + w]
    return out


def reference_peaks(frame, bad=None, *, k_sigma=3.0, grow_sigma=2.0, min_area=4, smooth=3, cell=16, smooth_cells=5,
                    background_passes=2, exclusion_margin=3):
    """The finder on the full frame: every pixel's snr, scipy's labels. Returns (labels image, significance)."""
    frame = np.asarray(frame, np.float32)
    valid = np.isfinite(frame) & (frame >= 0) & (True if bad is None else ~bad)
    grow = k_sigma if grow_sigma is None else min(grow_sigma, k_sigma)

    def segment(excluded):
        background, sigma = estimate_background(frame, bad_pixels=~valid | excluded, cell=cell,
                                                smooth_cells=smooth_cells)
        excess = frame - background
        excess[~valid] = 0.0
        if smooth > 1:
            snr = _box_sum(excess, smooth)
            snr /= np.maximum(_box_sum(valid.astype(np.float32), smooth), 0.5)
        else:
            snr = excess.copy()
        snr /= sigma
        region = (snr >= grow) & valid
        labels, n = ndimage.label(region, structure=np.ones((3, 3), bool))
        seeds = np.bincount(labels[region & (snr >= k_sigma)], minlength=n + 1)[1:] > 0
        support = np.bincount(labels[region & (excess >= grow * sigma)], minlength=n + 1)[1:]
        return labels, np.flatnonzero(seeds & (support >= min_area)), snr

    labels, kept, snr = segment(np.zeros(frame.shape, bool))
    for _ in range(background_passes - 1):
        if not kept.size:
            break
        peaks = np.isin(labels, kept + 1)
        if exclusion_margin > 0:
            peaks = _box_sum(peaks.astype(np.float32), 2 * exclusion_margin + 1) > 0
        labels, kept, snr = segment(peaks)
    significance = np.array([snr[labels == k + 1].max() for k in kept], np.float32)
    order = np.argsort(-significance, kind="stable")
    image = np.zeros(frame.shape, np.int32)
    for rank, k in enumerate(kept[order]):
        image[labels == k + 1] = rank + 1
    return image, significance[order]


def assert_same_peaks(result, reference):
    labels, significance = reference
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_array_equal(result.significance, significance)
    for k, mask in enumerate(result.masks):
        np.testing.assert_array_equal(mask, labels == k + 1)
    np.testing.assert_array_equal(result.boxes, masks_to_boxes(result.masks))


def simulated_frames(preset: str, seed: int, n_frames: int = 9):
    """Frames and bad pixels as the predictor hands them over (bad pixels filled, mask separate)."""
    scan = simulate_scan(n_frames=n_frames, preset=preset, seed=seed)
    bad = find_bad_pixels(scan.frames, saturation_value=scan.saturation_value)
    return fill_bad_pixels(scan.frames, bad), bad


def gapped_frame(seed: int, ring: float = 25.0, ring_width: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """A 560 x 700 frame in four modules (gaps marked -1): a solvent ring and 80 spots, some on the gaps."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:560, :700]
    radius = np.hypot(rows - 300, cols - 330)
    expected = 3.0 + ring * np.exp(-0.5 * ((radius - 220) / ring_width) ** 2)
    for r, c in zip(rng.uniform(0, 560, 80), rng.uniform(0, 700, 80)):
        width = rng.uniform(0.7, 2.5)
        expected += rng.uniform(10, 400) * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * width**2))
    frame = rng.poisson(expected).astype(np.float32)
    frame[270:290] = -1
    frame[:, 345:352] = -1
    bad = frame < 0
    return fill_bad_pixels(frame, bad)[()], bad


@pytest.mark.parametrize("preset,seed", [("realistic", 31), ("hard", 32), ("easy", 33)])
def test_finder_masks_equal_the_full_frame_formulas_on_simulated_scans(preset, seed):
    frames, bad = simulated_frames(preset, seed)
    finder = ClassicalFinder()
    results = finder(frames, bad)  # frames share the finder's remembered state where their masks agree
    assert sum(len(r) for r in results) > 0
    for frame, frame_bad, result in zip(frames, bad, results):
        assert_same_peaks(result, reference_peaks(frame, frame_bad))


@pytest.mark.parametrize("ring,ring_width", [(25.0, 30.0), (400.0, 10.0)])  # a steep ring: loose cell bounds
def test_finder_masks_equal_the_full_frame_formulas_with_module_gaps_and_many_peaks(ring, ring_width):
    frame, bad = gapped_frame(34, ring, ring_width)
    result = ClassicalFinder()(frame, bad)[0]
    assert len(result) > 40
    assert not result.labels[bad].any()
    assert_same_peaks(result, reference_peaks(frame, bad))
    # the same frame with Pilatus-style negative values instead of a mask
    raw = frame.copy()
    raw[bad] = -1
    assert_same_peaks(find_peaks_classical(raw), reference_peaks(raw))


@pytest.mark.parametrize("options", [
    dict(smooth=1), dict(smooth=5, cell=8), dict(smooth_cells=1), dict(smooth_cells=3, exclusion_margin=0),
    dict(grow_sigma=None), dict(grow_sigma=0.0), dict(background_passes=3), dict(k_sigma=5.0, min_area=1),
])
def test_finder_masks_equal_the_full_frame_formulas_for_other_settings(options):
    frame, bad = gapped_frame(35)
    frame, bad = frame[:300, :400], bad[:300, :400]
    assert_same_peaks(find_peaks_classical(frame, bad_pixels=bad, **options), reference_peaks(frame, bad, **options))


def test_result_background_is_the_last_pass_background():
    frame, bad = gapped_frame(36)
    result = find_peaks_classical(frame, bad_pixels=bad, background_passes=1)
    expected = estimate_background(frame, bad_pixels=bad)
    np.testing.assert_array_equal(result.background, expected.background)
    np.testing.assert_array_equal(result.sigma, expected.sigma)


def test_finder_remembers_masks_and_keeps_its_work_buffers_clean():
    frames, bad = simulated_frames("hard", 37, n_frames=5)
    other = bad.copy()
    other[:, 50:60, 100:140] = True  # a second mask, as another tile or a saturated peak would give
    finder = ClassicalFinder()
    for k in range(len(frames)):  # alternate between the masks: both stay remembered
        for mask in (bad[k], other[k]):
            result = finder.find(frames[k], mask)
            np.testing.assert_array_equal(result.labels, find_peaks_classical(frames[k], bad_pixels=mask).labels)
    states = finder._local.states
    assert len(states) == 2
    for state in states:
        assert not state.excess.any() and not state.marks.any()
        assert not any(m.any() for m in state._margin_marks.values())
        np.testing.assert_array_equal(state.padded.reshape(-1)[state.invalid], 0)


def test_finder_threads_and_pickles():
    frames, bad = simulated_frames("realistic", 38, n_frames=6)
    finder = ClassicalFinder(k_sigma=4.0)
    expected = [find_peaks_classical(f, bad_pixels=b, k_sigma=4.0).labels for f, b in zip(frames, bad)]
    with ThreadPoolExecutor(3) as pool:  # each thread has its own work buffers
        found = list(pool.map(lambda k: finder.find(frames[k], bad[k]).labels, list(range(6)) * 3))
    for k, labels in enumerate(found):
        np.testing.assert_array_equal(labels, expected[k % 6])
    clone = pickle.loads(pickle.dumps(finder))
    assert clone.config == finder.config
    np.testing.assert_array_equal(clone.find(frames[0], bad[0]).labels, expected[0])


def test_valid_pixels_fast_path_agrees_with_the_checks():
    rng = np.random.default_rng(39)
    frame = rng.poisson(3.0, (40, 50)).astype(np.float32)
    bad = rng.random((40, 50)) < 0.1
    np.testing.assert_array_equal(_valid_pixels(frame, bad), ~bad)
    for value in (np.nan, np.inf, -np.inf, -1.0):
        odd = frame.copy()
        odd[3, 4] = value
        expected = ~bad
        expected[3, 4] = False
        np.testing.assert_array_equal(_valid_pixels(odd, bad), expected)
    zero = frame.copy()
    zero[0, 0] = -0.0  # negative zero is a count of zero
    assert _valid_pixels(zero, None)[0, 0]
    state = _PixelState(~bad, cell=16, smooth=3)
    assert state.n_valid.sum() == (~bad).sum()


@pytest.mark.parametrize("spread_out", [False, True])
def test_components_number_like_scipy_label(spread_out):
    rng = np.random.default_rng(40)
    shape = (2000, 1500) if spread_out else (120, 150)  # scattered pixels take the graph path, a crop the labelling
    image = rng.random(shape) < (0.002 if spread_out else 0.3)
    image[5:9, 7:30] = True  # a long component, and one touching only diagonally
    image[9, 30] = True
    expected, n = ndimage.label(image, structure=np.ones((3, 3), bool))
    r, c = np.nonzero(image)
    count, component = _components(r, c, shape[1])
    assert count == n
    np.testing.assert_array_equal(component + 1, expected[r, c])
    assert _components(r[:0], c[:0], shape[1])[0] == 0


def test_finder_masks_equal_the_full_frame_formulas_on_random_small_frames_and_settings():
    """Odd cell sizes, frames smaller than a cell, mostly bad frames, NaN / inf / negative pixels, scaled counts."""
    rng = np.random.default_rng(41)
    for _ in range(40):
        h, w = int(rng.integers(3, 120)), int(rng.integers(3, 140))
        options = dict(cell=int(rng.choice([2, 3, 5, 8, 16, 17])), smooth=int(rng.choice([1, 3, 5])),
                       smooth_cells=int(rng.choice([1, 3, 5])), k_sigma=float(rng.choice([2.5, 3.0, 5.0])),
                       grow_sigma=rng.choice([None, 1.0, 2.0]), min_area=int(rng.integers(1, 6)),
                       background_passes=int(rng.integers(1, 4)), exclusion_margin=int(rng.integers(0, 4)))
        level = rng.choice([0.5, 4.0, 50.0]) * (1 + rng.random() * np.linspace(0, 3, w)) * np.ones((h, 1))
        frame = rng.poisson(level).astype(np.float32)
        for r, c in zip(rng.integers(0, h, 5), rng.integers(0, w, 5)):
            frame[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] += np.float32(30 * np.sqrt(level[0, c]) + 5)
        bad = rng.random((h, w)) < rng.choice([0.0, 0.02, 0.3, 0.95])
        if rng.random() < 0.3:
            frame[rng.random((h, w)) < 0.02] = rng.choice([-1.0, np.nan, np.inf])
        if rng.random() < 0.2:
            frame *= np.float32(0.37)
        result = find_peaks_classical(frame, bad_pixels=bad, **options)
        labels, significance = reference_peaks(frame, bad, **options)
        np.testing.assert_array_equal(result.labels, labels, err_msg=str(options))
        np.testing.assert_array_equal(result.significance, significance)
