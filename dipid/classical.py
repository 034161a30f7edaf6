"""The classical, label-free peak finder: local background, k-sigma seeds, hysteresis, components.

In the spirit of peakfinder8 (Cheetah/OnDA) and the DIALS dispersion spot finder, with no
training and no torch. It is dipid's baseline and the JointPredictor's fast candidate finder:

1. :func:`estimate_background` - a robust local background and noise level on a coarse grid of
   cells, smoothed across cells and interpolated back to pixels.
2. :func:`find_peaks_classical` - the excess over the background is averaged over a small box (a
   matched filter for peaks several pixels wide) and expressed in units of the per-pixel noise:
   ``snr = box_mean(counts - background) / sigma``, an estimate of the noise-free peak height in
   sigma. Pixels with ``snr >= k_sigma`` seed peaks; each seed grows over its connected pixels
   with ``snr >= grow_sigma``. With ``grow_sigma = 2`` a mask is where the estimated peak is at
   least 2 sqrt(background) above the background, which is how the simulator defines a peak's
   true extent. Bad pixels are never part of a peak.

All arrays are NumPy; a 195 x 487 Pilatus frame takes about 5 ms on one core without peaks and
about twice that with peaks (a second background pass, see ``background_passes``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from dipid.postprocess import masks_to_boxes

__all__ = [
    "Background",
    "ClassicalResult",
    "ClassicalConfig",
    "ClassicalFinder",
    "estimate_background",
    "find_peaks_classical",
    "significance_to_score",
]

logger = logging.getLogger(__name__)

#: 1.4826 * MAD estimates the standard deviation of normally distributed data.
_MAD_TO_SIGMA = 1.4826
#: Significance (in sigma) that maps to score 0.5; see :func:`significance_to_score`.
SCORE_HALF_SIGNIFICANCE = 3.0


class Background(NamedTuple):
    """Local background and noise of a frame (unpacks as ``background, sigma``).

    Attributes:
        background: (H, W) float32 expected counts without peaks.
        sigma: (H, W) float32 standard deviation of a background pixel, in counts (>= 1).
    """

    background: np.ndarray
    sigma: np.ndarray


def _check_odd(name: str, size: int) -> None:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"{name} must be an odd number >= 1 (a window centred on its pixel), got {size}")


def _valid_pixels(frame: np.ndarray, bad_pixels: np.ndarray | None) -> np.ndarray:
    """(H, W) bool: finite, non-negative (Pilatus marks dead and gap pixels < 0) and not flagged bad."""
    valid = np.isfinite(frame) & (frame >= 0)
    if bad_pixels is not None:
        bad = np.asarray(bad_pixels, dtype=bool)
        if bad.shape != frame.shape:
            raise ValueError(f"bad_pixels is {bad.shape} but the frame is {frame.shape}")
        valid &= ~bad
    return valid


def _sorted_median(sorted_values: np.ndarray, n_valid: np.ndarray) -> np.ndarray:
    """Median along the last axis of NaN-padded, ascending-sorted values with ``n_valid`` numbers each."""
    lo = np.maximum((n_valid - 1) // 2, 0)[..., None]
    hi = np.maximum(n_valid // 2, 0)[..., None]
    return 0.5 * (np.take_along_axis(sorted_values, lo, -1)[..., 0] + np.take_along_axis(sorted_values, hi, -1)[..., 0])


def _cell_statistics(values: np.ndarray, clip_sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust level and spread of each cell.

    Args:
        values: (..., P) float32 pixel values of each cell, NaN where a pixel is invalid.
        clip_sigma: upper clip, in units of the spread, that separates background from peaks.
    Returns:
        (level, spread, n_valid) per cell. ``level`` is the mean of the values below
        ``median + clip_sigma * max(sqrt(median), 1.4826 MAD, 1)`` and ``spread`` their standard
        deviation. The mean rather than the median because at a few counts per pixel the median
        of integers is biased (Poisson(0.7) has median 1, Poisson(2.5) median 2); the clip makes
        it robust to peak pixels. The spread is the clipped standard deviation rather than the
        MAD itself because the MAD of small integers is quantised (Poisson(1) gives 1.48, not 1).
    """
    values = np.sort(values, axis=-1)  # NaN sorts last
    n_valid = np.count_nonzero(~np.isnan(values), axis=-1)
    median = _sorted_median(values, n_valid)
    deviations = np.sort(np.abs(values - median[..., None]), axis=-1)
    mad_sigma = _MAD_TO_SIGMA * _sorted_median(deviations, n_valid)
    clip = median + clip_sigma * np.maximum.reduce([np.sqrt(np.maximum(median, 0)), mad_sigma, np.ones_like(median)])
    inside = values <= clip[..., None]  # False for NaN
    n_inside = np.maximum(np.count_nonzero(inside, axis=-1), 1)
    # Moments of the offsets from the median, not of the raw counts: no cancellation at high counts.
    offsets = np.where(inside, values - median[..., None], 0.0)
    mean_offset = offsets.sum(axis=-1, dtype=np.float64) / n_inside
    mean_square = np.square(offsets).sum(axis=-1, dtype=np.float64) / n_inside
    level = median + mean_offset
    spread = np.sqrt(np.maximum(mean_square - mean_offset * mean_offset, 0.0))
    return level, spread, n_valid


def _fill_missing_cells(grid: np.ndarray, missing: np.ndarray, default: float) -> np.ndarray:
    """Give cells without enough valid pixels the value of the nearest cell that has them."""
    if not missing.any():
        return grid
    if missing.all():
        return np.full_like(grid, default)
    _, (ri, ci) = ndimage.distance_transform_edt(missing, return_indices=True)
    return grid[ri, ci]


def _cell_layout(n_pixels: int, cell: int) -> tuple[int, int]:
    """Number of cells along an axis and the padding before the first one.

    The padding is split between both ends, so each edge cell keeps at least half its pixels
    (a 195-row frame in 16-row cells: edge cells of 10 and 9 rows, not one of 3 rows).
    """
    n_cells = -(-n_pixels // cell)
    return n_cells, (n_cells * cell - n_pixels) // 2


def _cell_centres(n_pixels: int, cell: int) -> np.ndarray:
    """Pixel coordinate of the centre of each cell's in-frame part along one axis."""
    n_cells, before = _cell_layout(n_pixels, cell)
    starts = np.maximum(np.arange(n_cells) * cell - before, 0)
    ends = np.minimum(np.arange(1, n_cells + 1) * cell - before, n_pixels)
    return (starts + ends - 1) / 2.0


@functools.lru_cache(maxsize=32)
def _interpolation_index(n_pixels: int, cell: int, n_cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each pixel along one axis: lower and upper neighbouring cell and the weight of the upper.

    Between cell centres this is linear interpolation; in the half cell beyond the outer centres
    the weights extrapolate the outer two cells linearly (weight < 0 or > 1), so a background
    gradient carries on to the detector edge instead of flattening there.
    """
    pixels = np.arange(n_pixels, dtype=np.float64)
    if n_cells == 1:
        zeros = np.zeros(n_pixels, np.intp)
        zeros.flags.writeable = False
        weights = np.zeros(n_pixels, np.float32)
        weights.flags.writeable = False
        return zeros, zeros, weights
    centres = _cell_centres(n_pixels, cell)
    lower = np.clip(np.searchsorted(centres, pixels, side="right") - 1, 0, n_cells - 2)
    upper = lower + 1
    frac = ((pixels - centres[lower]) / (centres[upper] - centres[lower])).astype(np.float32)
    for array in (lower, upper, frac):
        array.flags.writeable = False  # cached and shared between calls
    return lower, upper, frac


def _median_filter_cells(grid: np.ndarray, size: int) -> np.ndarray:
    """Median filter over the cell grid that keeps linear gradients, up to the grid's edges.

    A plain median filter pads by repeating the edge, which bends a gradient at the corners;
    padding by point reflection (2 * edge - mirror image) continues a plane exactly, and the
    median of a plane over a symmetric window is its centre value.
    """
    if size <= 1:
        return grid
    pad = size // 2
    if min(grid.shape) > 1:
        padded = np.pad(grid, pad, mode="reflect", reflect_type="odd")
    else:  # a single row or column of cells has no gradient to keep
        padded = np.pad(grid, pad, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size)).reshape(*grid.shape, size * size)
    middle = size * size // 2  # odd count: the median is one element
    return np.partition(windows, middle, axis=-1)[..., middle]


def _interpolate_cells(grid: np.ndarray, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Bilinear interpolation of per-cell values (at the cell centres) to every pixel, extrapolated at the edges."""
    grid = grid.astype(np.float32)
    r0, r1, fr = _interpolation_index(shape[0], cell, grid.shape[0])
    c0, c1, fc = _interpolation_index(shape[1], cell, grid.shape[1])
    # Separable: along rows on the small grid first, then along columns at full size. Indexing,
    # not a matmul: BLAS threads on tiny matrices cost more than they save on a busy machine.
    rows = grid[r0] * (1 - fr)[:, None] + grid[r1] * fr[:, None]  # (H, n_cell_cols)
    out = np.take(rows, c0, axis=1)
    out *= 1 - fc
    out += np.take(rows, c1, axis=1) * fc
    return out


def estimate_background(
    frame: np.ndarray,
    *,
    bad_pixels: np.ndarray | None = None,
    cell: int = 16,
    smooth_cells: int = 5,
    clip_sigma: float = 3.0,
) -> Background:
    """Robust local background and noise of one frame.

    The frame is cut into ``cell`` x ``cell`` cells (computed together by reshaping a padded
    copy). Each cell's level is a clipped mean and its spread a clipped standard deviation of its
    valid pixels (see ``_cell_statistics``); cells with fewer than ``cell**2 / 8`` valid pixels
    take their nearest neighbour's values. A ``smooth_cells`` median filter across the grid then
    removes cells dominated by peaks of up to about two cells across (the grid is padded by point
    reflection, so the filter keeps linear gradients up to the edges), and bilinear interpolation
    between cell centres, extrapolated over the outer half cells, gives every pixel its value.
    Peaks larger than that need the second pass of :func:`find_peaks_classical`.

    ``sigma = max(sqrt(max(background, 1)), spread)``: the Poisson term is the floor set by
    counting statistics, which holds even where a cell's spread underestimates it (a cell of
    almost all zeros has spread ~0 and would make every single count look significant); the
    measured spread takes over where the noise is larger than Poisson (charge sharing,
    fluorescence, diffuse scattering, frames that were scaled or summed).

    Args:
        frame: (H, W) counts (any real dtype). Negative and non-finite pixels count as bad.
        bad_pixels: optional (H, W) bool, True = ignore.
        cell: cell size in pixels.
        smooth_cells: size of the median filter over the cell grid, odd (1 = none).
        clip_sigma: clip level of the cell statistics, in units of their spread.
    Returns:
        :class:`Background` with (H, W) float32 ``background`` and ``sigma`` (counts).
    """
    frame = np.asarray(frame, dtype=np.float32)
    if frame.ndim != 2:
        raise ValueError(f"frame must be (H, W), got shape {frame.shape}")
    if cell < 2:
        raise ValueError(f"cell must be >= 2 pixels, got {cell}")
    _check_odd("smooth_cells", smooth_cells)
    h, w = frame.shape
    valid = _valid_pixels(frame, bad_pixels)
    (n_rows, top), (n_cols, left) = _cell_layout(h, cell), _cell_layout(w, cell)
    padded = np.full((n_rows * cell, n_cols * cell), np.nan, np.float32)
    padded[top:top + h, left:left + w] = np.where(valid, frame, np.nan)
    cells = padded.reshape(n_rows, cell, n_cols, cell).transpose(0, 2, 1, 3).reshape(n_rows, n_cols, cell * cell)
    level, spread, n_valid = _cell_statistics(cells, clip_sigma)
    missing = n_valid < max(cell * cell // 8, 2)
    if missing.all():
        # Too few valid pixels for any cell (a tiny or mostly bad frame): one level for all of it.
        whole = np.where(valid, frame, np.nan).reshape(1, -1)
        level_all, spread_all, n_all = _cell_statistics(whole, clip_sigma)
        if n_all[0] > 0:
            level, spread, missing = np.full_like(level, level_all[0]), np.full_like(spread, spread_all[0]), ~missing
    level = _fill_missing_cells(level, missing, 0.0)
    spread = _fill_missing_cells(spread, missing, 1.0)
    level = _median_filter_cells(level, smooth_cells)
    spread = _median_filter_cells(spread, smooth_cells)
    # Extrapolation at the edges can dip below zero on a steep gradient; counts cannot.
    background = np.maximum(_interpolate_cells(level, (h, w), cell), 0.0)
    sigma = np.maximum(np.sqrt(np.maximum(background, 1.0)), _interpolate_cells(spread, (h, w), cell))
    return Background(background, sigma.astype(np.float32))


def significance_to_score(significance: np.ndarray) -> np.ndarray:
    """Map peak significance (sigma, >= 0) monotonically to a score in [0, 1).

    ``score = 1 - 2 ** (-significance / 3)``: 3 sigma -> 0.5, 6 -> 0.75, 12 -> 0.94. The map does
    not depend on the detection threshold, so scores from runs with different ``k_sigma`` compare.
    """
    s = np.maximum(np.asarray(significance, dtype=np.float64), 0.0)
    return (1.0 - np.exp2(-s / SCORE_HALF_SIGNIFICANCE)).astype(np.float32)


@dataclass
class ClassicalResult:
    """Peaks the classical finder found in one frame.

    Attributes:
        masks: (N, H, W) bool, by descending score.
        scores: (N,) float32 in [0, 1), see :func:`significance_to_score`.
        boxes: (N, 4) float32 (x0, y0, x1, y1), x1/y1 exclusive.
        significance: (N,) float32 highest smoothed excess in each peak, in sigma.
        background: (H, W) float32 estimated background counts.
        sigma: (H, W) float32 background noise in counts.
    """

    masks: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    significance: np.ndarray
    background: np.ndarray
    sigma: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def _box_sum(values: np.ndarray, size: int) -> np.ndarray:
    """Sum over a size x size box (size odd) around each pixel, zero outside the frame.

    Shifted-slice additions: for the small boxes used here this is several times faster than
    ``ndimage.uniform_filter`` and exact for integer-valued input.
    """
    radius = size // 2
    h, w = values.shape
    padded = np.pad(values, radius)
    rows = padded[0:h].copy()
    for k in range(1, size):
        rows += padded[k:k + h]
    out = rows[:, 0:w].copy()
    for k in range(1, size):
        out += rows[:, k:k + w]
    return out


def _box_mean(values: np.ndarray, valid: np.ndarray, size: int) -> np.ndarray:
    """Mean of ``values`` (0 at invalid pixels) over the valid pixels of a size x size box around each pixel.

    Returns 0 where a box holds no valid pixel.
    """
    if size <= 1:
        return values.astype(np.float32, copy=True)
    total = _box_sum(values.astype(np.float32, copy=False), size)
    count = _box_sum(valid.astype(np.float32), size)
    np.maximum(count, 0.5, out=count)  # counts are whole numbers; 0.5 only guards the division
    total /= count
    return total


class _Segmentation(NamedTuple):
    labels: np.ndarray  # (H, W) int32 connected components of the grown region
    kept: np.ndarray  # (K,) labels - 1 of the components that are peaks
    snr: np.ndarray  # (H, W) float32 smoothed excess / sigma


def _segment(
    frame: np.ndarray, valid: np.ndarray, background: np.ndarray, sigma: np.ndarray, *,
    k_sigma: float, grow_level: float, min_area: int, smooth: int,
) -> _Segmentation:
    """Seeds, hysteresis growth and the size test for one background estimate."""
    excess = frame - background
    excess[~valid] = 0.0
    snr = _box_mean(excess, valid, smooth)
    snr /= sigma
    region = snr >= grow_level
    region &= valid
    labels, n_components = ndimage.label(region, structure=np.ones((3, 3), bool))
    if n_components == 0:
        return _Segmentation(labels, np.zeros(0, np.intp), snr)
    n_bins = n_components + 1
    # Count per component by indexing the few flagged pixels, not by weighting the whole frame.
    seed_labels = labels[region & (snr >= k_sigma)]
    has_seed = np.bincount(seed_labels, minlength=n_bins)[1:] > 0
    support_labels = labels[region & (excess >= grow_level * sigma)]
    support = np.bincount(support_labels, minlength=n_bins)[1:]
    return _Segmentation(labels, np.flatnonzero(has_seed & (support >= min_area)), snr)


def find_peaks_classical(
    frame: np.ndarray,
    *,
    bad_pixels: np.ndarray | None = None,
    k_sigma: float = 3.0,
    grow_sigma: float | None = 2.0,
    min_area: int = 4,
    smooth: int = 3,
    cell: int = 16,
    smooth_cells: int = 5,
    background_passes: int = 2,
    exclusion_margin: int = 3,
) -> ClassicalResult:
    """Find peaks in one frame without any training.

    Args:
        frame: (H, W) counts. Negative and non-finite pixels count as bad.
        bad_pixels: optional (H, W) bool, True = never part of a peak, ignored in the background.
        k_sigma: seed threshold on ``snr`` (box-averaged excess / per-pixel sigma).
        grow_sigma: seeds grow over connected pixels with ``snr >= grow_sigma`` (hysteresis);
            None or a value >= ``k_sigma`` keeps the seed pixels only.
        min_area: a peak needs at least this many pixels whose own (unsmoothed) excess is
            >= ``min(grow_sigma, k_sigma)`` sigma. Counting unsmoothed pixels rejects isolated hot
            pixels, whose smoothing footprint alone would look like a small peak.
        smooth: box size of the excess average, odd (1 = none); 3 suits peaks a few pixels across.
        cell, smooth_cells: passed to :func:`estimate_background`.
        background_passes: while peaks are found, up to this many times in all: estimate the
            background, find peaks; each pass after the first leaves out the peaks of the one
            before (dilated by ``exclusion_margin`` pixels). Peaks several cells wide otherwise
            lift the background under themselves and come out too small; frames without peaks
            take one pass.
    Returns:
        :class:`ClassicalResult`.
    """
    frame = np.asarray(frame, dtype=np.float32)
    if frame.ndim != 2:
        raise ValueError(f"frame must be (H, W), got shape {frame.shape}")
    _check_odd("smooth", smooth)
    h, w = frame.shape
    valid = _valid_pixels(frame, bad_pixels)
    grow_level = k_sigma if grow_sigma is None else min(grow_sigma, k_sigma)
    options = dict(k_sigma=k_sigma, grow_level=grow_level, min_area=min_area, smooth=smooth)
    background, sigma = estimate_background(frame, bad_pixels=~valid, cell=cell, smooth_cells=smooth_cells)
    seg = _segment(frame, valid, background, sigma, **options)
    for _ in range(max(background_passes, 1) - 1):
        if not seg.kept.size:
            break
        is_peak = np.zeros(seg.labels.max() + 1, bool)
        is_peak[seg.kept + 1] = True
        peak_pixels = is_peak[seg.labels]
        if exclusion_margin > 0:
            # Dilation by a square: any peak pixel within the box.
            peak_pixels = _box_sum(peak_pixels.astype(np.float32), 2 * exclusion_margin + 1) > 0
        background, sigma = estimate_background(frame, bad_pixels=~valid | peak_pixels, cell=cell,
                                                smooth_cells=smooth_cells)
        seg = _segment(frame, valid, background, sigma, **options)
    if seg.kept.size == 0:
        return ClassicalResult(np.zeros((0, h, w), bool), np.zeros(0, np.float32), np.zeros((0, 4), np.float32),
                               np.zeros(0, np.float32), background, sigma)
    # Per-component work inside each component's bounding box only (ndimage.maximum with an
    # index list sorts the whole label image, several times slower on a full frame).
    slices = ndimage.find_objects(seg.labels)
    masks = np.zeros((seg.kept.size, h, w), bool)
    peak_snr = np.zeros(seg.kept.size, np.float32)
    for k, index in enumerate(seg.kept):
        window = slices[index]
        inside = seg.labels[window] == index + 1
        masks[k][window] = inside
        peak_snr[k] = seg.snr[window][inside].max()
    order = np.argsort(-peak_snr, kind="stable")
    masks, peak_snr = masks[order], peak_snr[order]
    logger.debug("classical: %d peaks", len(masks))
    return ClassicalResult(masks, significance_to_score(peak_snr), masks_to_boxes(masks), peak_snr, background, sigma)


@dataclass(frozen=True)
class ClassicalConfig:
    """Settings of :class:`ClassicalFinder` (see :func:`find_peaks_classical` for each)."""

    name: str = "classical"
    k_sigma: float = 3.0
    grow_sigma: float | None = 2.0
    min_area: int = 4
    smooth: int = 3
    cell: int = 16
    smooth_cells: int = 5
    background_passes: int = 2
    exclusion_margin: int = 3


class ClassicalFinder:
    """The classical finder with a model-like interface: ``finder(frames, bad_pixels)``.

    Args:
        config: settings; keyword overrides replace single fields, e.g. ``ClassicalFinder(k_sigma=5)``.
    """

    def __init__(self, config: ClassicalConfig | None = None, **overrides: float | int | str | None):
        config = config or ClassicalConfig()
        known = {f.name for f in fields(ClassicalConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown ClassicalConfig fields {sorted(unknown)}; valid: {sorted(known)}")
        self.config = replace(config, **overrides)

    @property
    def name(self) -> str:
        return self.config.name

    def find(self, frame: np.ndarray, bad_pixels: np.ndarray | None = None) -> ClassicalResult:
        """Peaks of one (H, W) frame."""
        c = self.config
        return find_peaks_classical(frame, bad_pixels=bad_pixels, k_sigma=c.k_sigma, grow_sigma=c.grow_sigma,
                                    min_area=c.min_area, smooth=c.smooth, cell=c.cell, smooth_cells=c.smooth_cells,
                                    background_passes=c.background_passes, exclusion_margin=c.exclusion_margin)

    def __call__(self, frames: np.ndarray, bad_pixels: np.ndarray | None = None) -> list[ClassicalResult]:
        """Peaks of each frame.

        Args:
            frames: (B, H, W) counts (a single (H, W) frame is taken as B = 1).
            bad_pixels: None, (H, W) bool shared by all frames, or (B, H, W) bool.
        Returns:
            One :class:`ClassicalResult` per frame.
        """
        frames = np.asarray(frames)
        if frames.ndim == 2:
            frames = frames[None]
        if frames.ndim != 3:
            raise ValueError(f"frames must be (B, H, W), got shape {frames.shape}")
        if bad_pixels is not None:
            bad_pixels = np.asarray(bad_pixels, dtype=bool)
            if bad_pixels.ndim == 2:
                bad_pixels = np.broadcast_to(bad_pixels, frames.shape)
            if bad_pixels.shape != frames.shape:
                raise ValueError(f"bad_pixels is {bad_pixels.shape} but frames are {frames.shape}")
        return [self.find(frame, None if bad_pixels is None else bad_pixels[i]) for i, frame in enumerate(frames)]

    def __repr__(self) -> str:
        return f"ClassicalFinder({self.config!r})"
