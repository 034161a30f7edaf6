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

How it stays fast on large frames while giving exactly the masks of the plain full-frame
formulas (an Eiger 4M frame, 2162 x 2068 with ~170 peaks, in about 60 ms of one core; a Pilatus
100K frame in about 4.5 ms; ``benchmarks/classical_speed.py``):

- The background lives on the cell grid (136 x 130 cells for an Eiger 4M); full-size background
  and sigma images are only made when asked for (:attr:`ClassicalResult.background`), and the
  peaks come as one label image (:attr:`ClassicalResult.labels`), dense masks on demand.
- The robust cell statistics sort each cell once (comparing the floats' bits as integers), find
  the MAD and the clip by binary searches in the sorted cells, and sum the clipped moments a
  cache-sized chunk of cells at a time.
- Only *candidate* pixels get an exact ``snr``: a pixel can reach ``snr >= grow_sigma`` only if
  its box mean of counts reaches the lowest ``background + grow_sigma * sigma`` around it, which
  is bounded per block of 8 x 8 pixels (:func:`candidate_thresholds`) and then per pixel. One
  box sum over the frame screens the pixels; ``snr``, hysteresis and connected components are
  computed on the candidates with the same float32 operations as the full-frame formulas, so
  the result is the same to the bit.
- The second background pass (which leaves the peaks of the first out) recomputes only the cells
  the excluded peaks touch, median-filters again only the windows that changed and screens again
  only the blocks whose threshold changed.
- :class:`ClassicalFinder` keeps what depends only on which pixels are valid (the detector's
  module gaps and dead pixels: per-cell counts, box counts, work buffers) and reuses it for every
  frame with the same bad-pixel mask, i.e. once per scan.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "Background",
    "ClassicalResult",
    "ClassicalConfig",
    "ClassicalFinder",
    "candidate_thresholds",
    "estimate_background",
    "find_peaks_classical",
    "significance_to_score",
]

logger = logging.getLogger(__name__)

#: 1.4826 * MAD estimates the standard deviation of normally distributed data.
_MAD_TO_SIGMA = 1.4826
#: Significance (in sigma) that maps to score 0.5; see :func:`significance_to_score`.
SCORE_HALF_SIGNIFICANCE = 3.0
#: Clip level of the cell statistics used by the finder, in units of their spread.
_CLIP_SIGMA = 3.0
#: Relative and absolute slack of the candidate screen: float32 rounding must never drop a pixel.
_SCREEN_SLACK = (1e-4, 1e-3)


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


def _check_cell(cell: int) -> None:
    if cell < 2:
        raise ValueError(f"cell must be >= 2 pixels, got {cell}")


def _valid_pixels(frame: np.ndarray, bad_pixels: np.ndarray | None) -> np.ndarray:
    """(H, W) bool: finite, non-negative (Pilatus marks dead and gap pixels < 0) and not flagged bad."""
    bad = None
    if bad_pixels is not None:
        bad = np.asarray(bad_pixels, dtype=bool)
        if bad.shape != frame.shape:
            raise ValueError(f"bad_pixels is {bad.shape} but the frame is {frame.shape}")
    if frame.size and frame.min() >= 0 and frame.max() < np.inf:  # NaN fails both: every value is usable
        return np.ones(frame.shape, bool) if bad is None else ~bad
    valid = np.isfinite(frame)
    valid &= frame >= 0
    if bad is not None:
        np.greater(valid, bad, out=valid)  # valid and not bad
    return valid


# --- robust statistics of cells ------------------------------------------------------------------

def _sorted_median(sorted_values: np.ndarray, n_valid: np.ndarray) -> np.ndarray:
    """Median along the last axis of NaN-padded, ascending-sorted values with ``n_valid`` numbers each."""
    lo = np.maximum((n_valid - 1) // 2, 0)[..., None]
    hi = np.maximum(n_valid // 2, 0)[..., None]
    return 0.5 * (np.take_along_axis(sorted_values, lo, -1)[..., 0] + np.take_along_axis(sorted_values, hi, -1)[..., 0])


def _median_deviation(sorted_values: np.ndarray, centre: np.ndarray, n_valid: np.ndarray) -> np.ndarray:
    """Median absolute deviation from ``centre`` of each row's valid values, without sorting the deviations.

    Args:
        sorted_values: (R, P) float32, each row ascending with its ``n_valid`` numbers first (NaN after).
        centre: (R,) float32 value the deviations are taken from (the row's median).
        n_valid: (R,) int numbers in each row.
    Returns:
        (R,) float32, equal to the median of ``np.abs(values - centre)`` taken as the mean of the
        two middle sorted deviations (NaN for rows without numbers).

    The k + 1 values nearest the centre are a run ``v[a : a + k + 1]`` of the sorted row, and the
    k-th smallest deviation (from 0) is the smallest ``max(centre - v[a], v[a + k] - centre)`` over
    the runs. The first term falls and the second rises with ``a``, so a binary search for where
    they cross finds it, in about log2(P) gathers per row instead of a second sort; the (k + 1)-th
    is then the nearer of the run's two outside neighbours. ``centre - v`` is the exact negation
    of ``v - centre`` in floating point, so the result is the same to the bit.
    """
    rows, width = sorted_values.shape
    flat = sorted_values.reshape(-1)
    base = np.arange(rows, dtype=np.intp) * width
    has = n_valid > 0
    n = np.where(has, n_valid, 1).astype(np.intp)
    k = (n - 1) // 2  # the lower middle deviation; the upper one is k + 1 when n is even
    last = n - 1 - k  # largest run start
    centre = centre.astype(np.float32, copy=False)
    lo, hi = np.zeros(rows, np.intp), last + 1  # search: first start whose upper end reaches as far as its lower end
    for _ in range(int(hi.max()).bit_length()):
        mid = (lo + hi) >> 1
        probe = base + np.minimum(mid, last)
        crossed = flat[probe + k] - centre >= centre - flat[probe]
        hi = np.where(crossed, mid, hi)
        lo = np.minimum(np.where(crossed, lo, mid + 1), hi)  # rows already found (lo == hi) stay put
    upper = flat[base + np.minimum(lo, last) + k] - centre  # widest deviation of the run starting at lo
    lower = centre - flat[base + np.maximum(lo - 1, 0)]  # widest deviation of the run starting at lo - 1
    earlier = (lo > last) | ((lo >= 1) & (lower < upper))
    start = np.where(earlier, lo - 1, lo)
    kth = np.where(earlier, lower, upper)
    # The next nearest value is one of the run's two neighbours.
    left, right = start - 1, start + k + 1
    left_deviation = centre - flat[base + np.maximum(left, 0)]
    right_deviation = flat[base + np.minimum(right, n - 1)] - centre
    next_kth = np.where(left < 0, right_deviation,
                        np.where(right > n - 1, left_deviation, np.minimum(left_deviation, right_deviation)))
    mad = 0.5 * (kth + np.where(n % 2 == 0, next_kth, kth))
    return np.where(has, mad, np.float32(np.nan)).astype(np.float32)


def _count_at_most(sorted_values: np.ndarray, n_valid: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """(R,) int: how many of each row's ``n_valid`` ascending values (of (R, P), NaN after them) are <= ``limit`` (R,).

    A binary search per row, about log2(P) gathers, instead of a comparison of every value.
    """
    rows, width = sorted_values.shape
    flat = sorted_values.reshape(-1)
    base = np.arange(rows, dtype=np.intp) * width
    lo, hi = np.zeros(rows, np.intp), np.asarray(n_valid, np.intp).copy()
    for _ in range(int(hi.max(initial=0)).bit_length()):
        mid = (lo + hi) >> 1
        below = flat[base + np.minimum(mid, width - 1)] <= limit
        hi = np.where(below, hi, mid)
        lo = np.minimum(np.where(below, mid + 1, lo), hi)  # rows already found (lo == hi) stay put
    return lo


#: Rows with at most this many values above the clip are summed whole and those values taken off after.
_SHORT_TAIL = 16
#: Rows of cells per chunk when a pass over all cells is done a chunk at a time (1 MB of 16 x 16 cells).
_CHUNK_ROWS = 1024


def _clipped_moments(
    values: np.ndarray, centre: np.ndarray, n_inside: np.ndarray, n_valid: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Sums of the offsets from ``centre`` and of their squares over each row's first ``n_inside`` values.

    Args:
        values: (R, P) float32 rows, ascending, ``n_valid`` numbers first; overwritten.
        centre: (R,) float32 (the rows' medians); n_inside, n_valid: (R,) int, n_inside <= n_valid.
    Returns:
        (R,) float64 sums of ``values - centre`` and of ``(values - centre) ** 2``, offsets and
        squares rounded to float32 as a float32 computation gives them.

    Most rows have only a few values above the clip: they are summed whole (a chunk of rows at a
    time, while it is in the cache) and the few values taken off; the rest are summed over the
    prefix. Float32 numbers summed in float64 give the exact sum in any order unless they span
    more than 2^29 in magnitude, so this equals the masked sum.
    """
    rows, width = values.shape
    tail = n_valid - n_inside
    short = tail <= _SHORT_TAIL
    # The values past the clip of the short-tailed rows, and the long-tailed rows, before they are overwritten.
    few = np.flatnonzero(short & (tail > 0))
    steps = np.arange(_SHORT_TAIL)
    where = few[:, None] * width + np.minimum(n_inside[few, None] + steps, width - 1)
    tail_offsets = np.where(steps < tail[few, None], values.reshape(-1)[where] - centre[few, None], np.float32(0))
    many = np.flatnonzero(~short)
    many_offsets = np.where(np.arange(width) < n_inside[many, None], values[many] - centre[many, None], np.float32(0))
    # Invalid positions of partly valid rows take the centre, so their offsets are 0.
    partial = np.flatnonzero(n_valid < width)
    if partial.size:
        values[partial] = np.where(np.arange(width) < n_valid[partial, None], values[partial], centre[partial, None])
    total, squares = np.empty(rows), np.empty(rows)
    for start in range(0, rows, _CHUNK_ROWS):
        chunk = slice(start, start + _CHUNK_ROWS)
        offsets = np.subtract(values[chunk], centre[chunk, None], out=values[chunk])
        total[chunk] = np.einsum("ij->i", offsets, dtype=np.float64)  # faster than sum(dtype=float64)
        np.square(offsets, out=offsets)
        squares[chunk] = np.einsum("ij->i", offsets, dtype=np.float64)
    total[few] -= tail_offsets.sum(axis=-1, dtype=np.float64)
    squares[few] -= np.square(tail_offsets).sum(axis=-1, dtype=np.float64)
    total[many] = many_offsets.sum(axis=-1, dtype=np.float64)
    squares[many] = np.square(many_offsets).sum(axis=-1, dtype=np.float64)
    return total, squares


def _cell_statistics(
    values: np.ndarray, clip_sigma: float, *, n_valid: np.ndarray | None = None, overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust level and spread of each cell.

    Args:
        values: (R, P) float32 pixel values of each of R cells, >= 0 (counts), NaN where a pixel is
            invalid. (Being non-negative, they sort as their bit patterns do, which is faster.)
        clip_sigma: upper clip, in units of the spread, that separates background from peaks.
        n_valid: (R,) int number of valid values in each row, when known.
        overwrite: ``values`` may be sorted and then overwritten in place (saves copies of a large array).
    Returns:
        (level, spread, n_valid), each (R,): float64 counts, float64 counts, int. ``level`` is the
        mean of the values below ``median + clip_sigma * max(sqrt(median), 1.4826 MAD, 1)`` and
        ``spread`` their standard deviation. The mean rather than the median because at a few
        counts per pixel the median of integers is biased (Poisson(0.7) has median 1, Poisson(2.5)
        median 2); the clip makes it robust to peak pixels. The spread is the clipped standard
        deviation rather than the MAD itself because the MAD of small integers is quantised
        (Poisson(1) gives 1.48, not 1). Rows without valid pixels give NaN levels.
    """
    if not overwrite:
        values = values.copy()
    # Non-negative floats and NaN order as their bits read as int32 do (NaN last, -0 first): same order, faster sort.
    values.view(np.int32).sort(axis=-1)
    if n_valid is None:
        n_valid = values.shape[-1] - np.count_nonzero(np.isnan(values), axis=-1)
    median = _sorted_median(values, n_valid)
    mad_sigma = _MAD_TO_SIGMA * _median_deviation(values, median, n_valid)
    clip = median + clip_sigma * np.maximum.reduce([np.sqrt(np.maximum(median, 0)), mad_sigma, np.ones_like(median)])
    inside = _count_at_most(values, n_valid, clip)  # the values <= clip: a prefix of each sorted row
    n_inside = np.maximum(inside, 1)
    # Moments of the offsets from the median, not of the raw counts: no cancellation at high counts.
    total, squares = _clipped_moments(values, median, inside, n_valid)
    mean_offset = total / n_inside
    mean_square = squares / n_inside
    level = median + mean_offset
    spread = np.sqrt(np.maximum(mean_square - mean_offset * mean_offset, 0.0))
    return level, spread, n_valid


# --- the cell grid ----------------------------------------------------------------------------

def _nearest_kept_cell(missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every cell of an (n_rows, n_cols) grid, the (row, col) of the nearest cell not ``missing`` (some must be)."""
    _, (ri, ci) = ndimage.distance_transform_edt(missing, return_indices=True)
    return ri, ci


def _fill_missing_cells(grid: np.ndarray, missing: np.ndarray, default: float,
                        nearest: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Give cells without enough valid pixels the value of the nearest cell that has them.

    ``nearest``: :func:`_nearest_kept_cell` of ``missing`` when already known.
    """
    if not missing.any():
        return grid
    if missing.all():
        return np.full_like(grid, default)
    ri, ci = _nearest_kept_cell(missing) if nearest is None else nearest
    return grid[ri, ci]


class _FillCache:
    """Where the empty cells of the last few ``missing`` grids take their values from (:func:`_nearest_kept_cell`).

    A scan's gaps leave the same cells empty in every frame; leaving peaks out can empty a few more.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]] = []

    def __call__(self, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        if not missing.any() or missing.all():
            return None
        for k, (known, nearest) in enumerate(self.entries):
            if np.array_equal(known, missing):
                self.entries.insert(0, self.entries.pop(k))
                return nearest
        nearest = _nearest_kept_cell(missing)
        self.entries = [(missing.copy(), nearest)] + self.entries[:self.size - 1]
        return nearest


def _cell_layout(n_pixels: int, cell: int) -> tuple[int, int]:
    """Number of cells along an axis and the padding before the first one.

    The padding is split between both ends, so each edge cell keeps at least half its pixels
    (a 195-row frame in 16-row cells: edge cells of 10 and 9 rows, not one of 3 rows).
    """
    n_cells = -(-n_pixels // cell)
    return n_cells, (n_cells * cell - n_pixels) // 2


@functools.lru_cache(maxsize=32)
def _cell_centres(n_pixels: int, cell: int) -> np.ndarray:
    """Pixel coordinate of the centre of each cell's in-frame part along one axis (read-only, cached)."""
    n_cells, before = _cell_layout(n_pixels, cell)
    starts = np.maximum(np.arange(n_cells) * cell - before, 0)
    ends = np.minimum(np.arange(1, n_cells + 1) * cell - before, n_pixels)
    centres = (starts + ends - 1) / 2.0
    centres.flags.writeable = False
    return centres


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


@functools.lru_cache(maxsize=32)
def _complement_weights(n_pixels: int, cell: int, n_cells: int) -> np.ndarray:
    """(n_pixels,) float32 ``1 - frac`` of :func:`_interpolation_index`, computed once."""
    weights = (1 - _interpolation_index(n_pixels, cell, n_cells)[2]).astype(np.float32)
    weights.flags.writeable = False
    return weights


def _pad_for_median(grids: np.ndarray, size: int) -> np.ndarray:
    """Pad (G, n_rows, n_cols) float64 grids by ``size // 2`` cells for the median filter; float32 result.

    A plain median filter pads by repeating the edge, which bends a gradient at the corners;
    padding by point reflection (2 * edge - mirror image) continues a plane exactly, and the
    median of a plane over a symmetric window is its centre value. A single row or column of
    cells has no gradient to keep and is padded by repetition. The padding is computed in float64
    and then rounded, so the float32 medians are the float64 medians rounded.
    """
    pad = ((0, 0), (size // 2, size // 2), (size // 2, size // 2))
    if min(grids.shape[1:]) > 1:
        padded = np.pad(grids, pad, mode="reflect", reflect_type="odd")
    else:
        padded = np.pad(grids, pad, mode="edge")
    return padded.astype(np.float32)


def _window_medians(padded: np.ndarray, size: int, rows: np.ndarray | None = None,
                    cols: np.ndarray | None = None) -> np.ndarray:
    """Medians of the size x size windows of padded (G, n_rows + 2p, n_cols + 2p) grids.

    Returns (G, n_rows, n_cols), or (G, K) for the K windows whose top-left corners are (rows, cols).
    """
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
    if rows is not None:
        windows = windows[:, rows, cols]
    windows = windows.reshape(*windows.shape[:-2], size * size)
    middle = size * size // 2  # odd count: the median is one element
    return np.partition(windows, middle, axis=-1)[..., middle]


class _CellGrid(NamedTuple):
    """A frame's background model: one level and one spread per cell, interpolated between cell centres.

    Attributes:
        level: (n_rows, n_cols) float32 background counts at each cell centre.
        spread: (n_rows, n_cols) float32 background noise at each cell centre, counts.
        shape: (H, W) of the frame.
        cell: cell size, pixels.
        padded: (2, n_rows + 2p, n_cols + 2p) float32 level and spread before the median filter,
            padded for it (None without a filter): a later model compares its own to it and
            filters again only the windows that changed.
    """

    level: np.ndarray
    spread: np.ndarray
    shape: tuple[int, int]
    cell: int
    padded: np.ndarray | None = None


def _interpolate_rows(grid: np.ndarray, n_pixels: int, cell: int) -> np.ndarray:
    """First (row) step of the bilinear interpolation: (n_rows, n_cols) float32 -> (H, n_cols) float32."""
    r0, r1, fr = _interpolation_index(n_pixels, cell, grid.shape[0])
    return grid[r0] * (1 - fr)[:, None] + grid[r1] * fr[:, None]


def _interpolate_cells(grid: np.ndarray, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Bilinear interpolation of per-cell values (at the cell centres) to every pixel, extrapolated at the edges.

    Args:
        grid: (n_rows, n_cols) values at the cell centres (cast to float32).
        shape: (H, W) of the frame; cell: cell size in pixels.
    Returns:
        (H, W) float32.
    """
    grid = grid.astype(np.float32)
    c0, c1, fc = _interpolation_index(shape[1], cell, grid.shape[1])
    # Separable: along rows on the small grid first, then along columns at full size. Indexing,
    # not a matmul: BLAS threads on tiny matrices cost more than they save on a busy machine.
    rows = _interpolate_rows(grid, shape[0], cell)  # (H, n_cell_cols)
    out = np.take(rows, c0, axis=1)
    out *= 1 - fc
    out += np.take(rows, c1, axis=1) * fc
    return out


def _interpolate_at(rows: np.ndarray, shape: tuple[int, int], cell: int, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The values :func:`_interpolate_cells` gives at pixels (r, c) only, with the same float32 operations.

    Args:
        rows: (H, n_cols) float32 from :func:`_interpolate_rows`.
        r, c: (K,) int pixel coordinates.
    Returns:
        (K,) float32, bit-identical to ``_interpolate_cells(grid, shape, cell)[r, c]``.
    """
    c0, c1, fc = _interpolation_index(shape[1], cell, rows.shape[1])
    out = rows[r, c0[c]] * _complement_weights(shape[1], cell, rows.shape[1])[c]
    out += rows[r, c1[c]] * fc[c]
    return out


def _background_from_grid(grid: _CellGrid) -> Background:
    """Full-size background and sigma of a cell grid (see :func:`estimate_background` for the formulas)."""
    # Extrapolation at the edges can dip below zero on a steep gradient; counts cannot.
    background = np.maximum(_interpolate_cells(grid.level, grid.shape, grid.cell), 0.0)
    sigma = np.maximum(np.sqrt(np.maximum(background, 1.0)), _interpolate_cells(grid.spread, grid.shape, grid.cell))
    return Background(background, sigma.astype(np.float32))


def _smooth_grid(
    level: np.ndarray, spread: np.ndarray, n_valid: np.ndarray, *, shape: tuple[int, int], cell: int,
    smooth_cells: int, clip_sigma: float, whole_frame, fill_cache: _FillCache | None = None,
    previous: _CellGrid | None = None,
) -> _CellGrid:
    """Per-cell statistics -> the background model: gaps filled, median-filtered across cells.

    Args:
        level, spread: (n_rows, n_cols) float64 from :func:`_cell_statistics`.
        n_valid: (n_rows, n_cols) int valid pixels per cell.
        whole_frame: callable returning (1, H * W) float32, the frame with NaN at invalid pixels;
            used only when no cell has enough valid pixels (a tiny or mostly bad frame).
        fill_cache: remembers where empty cells take their values from, between calls.
        previous: the model of the same frame before (the first pass): only the windows of the
            median filter whose values changed are filtered again.
    """
    missing = n_valid < max(cell * cell // 8, 2)
    if missing.all():
        # Too few valid pixels for any cell (a tiny or mostly bad frame): one level for all of it.
        level_all, spread_all, n_all = _cell_statistics(whole_frame(), clip_sigma)
        if n_all[0] > 0:
            level, spread, missing = np.full_like(level, level_all[0]), np.full_like(spread, spread_all[0]), ~missing
    nearest = (fill_cache or _FillCache())(missing)
    filled = np.stack([_fill_missing_cells(level, missing, 0.0, nearest),
                       _fill_missing_cells(spread, missing, 1.0, nearest)])
    if smooth_cells <= 1:
        level, spread = filled.astype(np.float32)
        return _CellGrid(level, spread, shape, cell)
    padded = _pad_for_median(filled, smooth_cells)
    if previous is None or previous.padded is None or previous.padded.shape != padded.shape:
        level, spread = _window_medians(padded, smooth_cells)
        return _CellGrid(level, spread, shape, cell, padded)
    # Only windows that contain a changed value can have a changed median.
    changed = (padded != previous.padded).any(axis=0)
    stale = np.lib.stride_tricks.sliding_window_view(changed, (smooth_cells, smooth_cells)).any(axis=(2, 3))
    level, spread = previous.level.copy(), previous.spread.copy()
    rows, cols = np.nonzero(stale)
    if rows.size:
        level[rows, cols], spread[rows, cols] = _window_medians(padded, smooth_cells, rows, cols)
    return _CellGrid(level, spread, shape, cell, padded)


def _frame_cells(frame: np.ndarray, valid: np.ndarray, cell: int) -> np.ndarray:
    """(n_rows * n_cols, cell * cell) float32: the frame cut into cells, NaN at invalid pixels and padding."""
    h, w = frame.shape
    (n_rows, top), (n_cols, left) = _cell_layout(h, cell), _cell_layout(w, cell)
    padded = np.full((n_rows * cell, n_cols * cell), np.nan, np.float32)
    np.copyto(padded[top:top + h, left:left + w], frame, where=valid)
    return padded.reshape(n_rows, cell, n_cols, cell).transpose(0, 2, 1, 3).reshape(n_rows * n_cols, cell * cell)


def estimate_background(
    frame: np.ndarray,
    *,
    bad_pixels: np.ndarray | None = None,
    cell: int = 16,
    smooth_cells: int = 5,
    clip_sigma: float = _CLIP_SIGMA,
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
    _check_cell(cell)
    _check_odd("smooth_cells", smooth_cells)
    valid = _valid_pixels(frame, bad_pixels)
    grid = _background_grid(frame, valid, cell=cell, smooth_cells=smooth_cells, clip_sigma=clip_sigma)
    return _background_from_grid(grid)


def _background_grid(frame: np.ndarray, valid: np.ndarray, *, cell: int, smooth_cells: int,
                     clip_sigma: float) -> _CellGrid:
    """The background model of a frame from its valid pixels (all cells computed)."""
    (n_rows, _), (n_cols, _) = _cell_layout(frame.shape[0], cell), _cell_layout(frame.shape[1], cell)
    level, spread, n_valid = _cell_statistics(_frame_cells(frame, valid, cell), clip_sigma, overwrite=True)
    grid_shape = (n_rows, n_cols)
    return _smooth_grid(level.reshape(grid_shape), spread.reshape(grid_shape), n_valid.reshape(grid_shape),
                        shape=frame.shape, cell=cell, smooth_cells=smooth_cells, clip_sigma=clip_sigma,
                        whole_frame=lambda: np.where(valid, frame, np.float32(np.nan)).reshape(1, -1))


# --- where peaks can be --------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _knot_ranges(n_pixels: int, cell: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """For each cell along one axis: the knots whose values bound its pixels widened by ``radius``.

    The knots are the axis's first pixel, the cell centres and its last pixel; between two
    neighbouring knots the interpolated background is linear. Returns ``(lo, hi)``, each
    (n_cells,) int: knots ``lo .. hi`` (indices into ``[first, centres..., last]``) bracket the
    pixels ``cell start - radius .. cell end + radius`` (clipped to the axis).
    """
    n_cells, before = _cell_layout(n_pixels, cell)
    knots = np.concatenate([[0.0], _cell_centres(n_pixels, cell), [n_pixels - 1.0]])
    starts = np.maximum(np.arange(n_cells) * cell - before - radius, 0)
    ends = np.minimum(np.arange(1, n_cells + 1) * cell - before - 1 + radius, n_pixels - 1)
    lo = np.searchsorted(knots, starts, side="right") - 1
    hi = np.searchsorted(knots, ends, side="left")
    for array in (lo, hi):
        array.flags.writeable = False
    return lo, hi


def _knot_values(grid: np.ndarray, n_pixels: int, cell: int) -> np.ndarray:
    """(n + 2, ...) float64: the interpolated values at the first pixel, at each cell centre and at the last pixel."""
    lower, upper, frac = _interpolation_index(n_pixels, cell, grid.shape[0])
    grid = grid.astype(np.float64)
    ends = [grid[lower[p]] * (1.0 - float(frac[p])) + grid[upper[p]] * float(frac[p]) for p in (0, n_pixels - 1)]
    return np.concatenate([ends[0][None], grid, ends[1][None]])


def _range_min(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Minimum of ``values[lo[i] : hi[i] + 1]`` along axis 0 for each i (ranges non-empty)."""
    out = values[lo]
    for d in range(1, int((hi - lo).max(initial=0)) + 1):  # ranges are a few knots long
        np.minimum(out, values[np.minimum(lo + d, hi)], out=out)
    return out


def _grid_lower_bound(grid: np.ndarray, shape: tuple[int, int], cell: int, radius: int) -> np.ndarray:
    """(n_rows, n_cols) float64 lower bound of the interpolated grid over each cell's pixels widened by ``radius``.

    The interpolation is bilinear between neighbouring knots (cell centres and the frame's edges,
    where it extrapolates), so over each patch between knots it is a convex combination of the
    patch's four corner values; the minimum over the knots around a cell bounds it from below.
    """
    values = _knot_values(grid, shape[0], cell)  # (n_rows + 2, n_cols)
    values = _knot_values(values.T, shape[1], cell).T  # (n_rows + 2, n_cols + 2)
    lo, hi = _knot_ranges(shape[0], cell, radius)
    values = _range_min(values, lo, hi)
    lo, hi = _knot_ranges(shape[1], cell, radius)
    return _range_min(values.T, lo, hi).T


@functools.lru_cache(maxsize=32)
def _weight_spread(n_pixels: int, cell: int, n_cells: int) -> np.ndarray:
    """(max(n_cells - 1, 1),) float64: per interpolation patch along an axis, the largest ``|1 - f| + |f|``
    of its pixels' weights ``f`` (1 between cell centres, up to about 2 where the edges extrapolate)."""
    lower, _, frac = _interpolation_index(n_pixels, cell, n_cells)
    out = np.ones(max(n_cells - 1, 1))
    np.maximum.at(out, np.minimum(lower, len(out) - 1), np.abs(1.0 - frac) + np.abs(frac.astype(np.float64)))
    out.flags.writeable = False
    return out


def _patch_slopes(grid: np.ndarray, shape: tuple[int, int], cell: int, radius: float) -> np.ndarray:
    """How much the interpolated grid can change per pixel of distance, per interpolation patch.

    Args:
        grid: (n_rows, n_cols) values at the cell centres; shape: (H, W).
        radius: the farthest (pixels, along each axis) the pixels compared with a pixel can be.
    Returns:
        (max(n_rows - 1, 1), max(n_cols - 1, 1)) float64: for the pixels p whose lower
        interpolation cells are (i, j) (see :func:`_interpolation_index`), times ``d``, a bound on
        ``|f(q) - f(p)|`` over the pixels q at most ``d <= radius`` away along each axis. In a
        patch the interpolation's slope along rows is a weighted sum of its two row differences
        over the centres' distance, the weights ``1 - v`` and ``v`` of the column position (outside
        [0, 1] where the edges extrapolate), so it is at most ``(|1 - v| + |v|)`` times the larger
        difference; along columns the same. Within ``radius`` the neighbouring patches count too.
    """
    grid = grid.astype(np.float64)
    n_rows, n_cols = grid.shape
    patches = (max(n_rows - 1, 1), max(n_cols - 1, 1))
    total = np.zeros(patches)
    if n_rows > 1:  # change along rows: differences between cell rows, the larger of each patch's two columns
        step = np.abs(np.diff(grid, axis=0)) / np.diff(_cell_centres(shape[0], cell))[:, None]
        step = np.maximum(step[:, :-1], step[:, 1:]) if n_cols > 1 else step
        total += step * _weight_spread(shape[1], cell, n_cols)[None, :]
    if n_cols > 1:
        step = np.abs(np.diff(grid, axis=1)) / np.diff(_cell_centres(shape[1], cell))[None, :]
        step = np.maximum(step[:-1], step[1:]) if n_rows > 1 else step
        total += step * _weight_spread(shape[0], cell, n_rows)[:, None]
    reach = 1 + 2 * int(np.ceil(radius / max(cell / 2, 1)))  # patches are at least half a cell wide
    return ndimage.maximum_filter(total, size=reach, mode="nearest")


def _screen_block(cell: int) -> int:
    """Side of the square blocks of pixels that share a candidate threshold: half a cell (a quarter of it)."""
    return cell // 2 if cell % 2 == 0 and cell >= 4 else cell


def _interpolate_lattice(grid: np.ndarray, shape: tuple[int, int], cell: int, ys: np.ndarray,
                         xs: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs)) float64 bilinear interpolation of the cell grid at real coordinates ys x xs.

    The rule of :func:`_interpolation_index` (extrapolating beyond the outer centres) at positions
    that need not be whole pixels; float64, for bounds rather than for bit-exact values.
    """
    values = grid.astype(np.float64)
    for axis, (n_pixels, positions) in enumerate(((shape[0], ys), (shape[1], xs))):
        n_cells = values.shape[axis]
        if n_cells == 1:
            values = np.repeat(values, len(positions), axis=axis)
            continue
        centres = _cell_centres(n_pixels, cell)
        lower = np.clip(np.searchsorted(centres, positions, side="right") - 1, 0, n_cells - 2)
        frac = (positions - centres[lower]) / (centres[lower + 1] - centres[lower])
        frac = np.expand_dims(frac, 1 - axis)
        values = np.take(values, lower, axis=axis) * (1 - frac) + np.take(values, lower + 1, axis=axis) * frac
    return values


def _slope_reach(cell: int, smooth: int) -> float:
    """From a screen block's centre to the farthest pixel of its pixels' boxes, pixels along each axis."""
    return (_screen_block(cell) - 1) / 2 + smooth // 2


def candidate_thresholds(
    level: np.ndarray, spread: np.ndarray, shape: tuple[int, int], *, cell: int, smooth: int, grow_level: float,
    slopes: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Per block of pixels, the box mean of counts below which none of them can reach ``snr >= grow_level``.

    A pixel's ``snr = box_mean(counts - background) / sigma`` (means over the valid pixels of its
    ``smooth`` x ``smooth`` box) reaches ``grow_level > 0`` only if its box mean of counts is at
    least ``min(background) + grow_level * min(sigma)``, minima over the box. Both minima are
    bounded from below for each block of b x b pixels (b = half a cell, see ``_screen_block``; the
    blocks tile the frame padded to whole cells) in two ways, and the larger bound is used: the
    interpolated value at the block's centre less the most it can change over the block and the
    box (:func:`_patch_slopes`), and the smallest value at the knots around the block's cell
    (:func:`_grid_lower_bound`). A small relative and absolute slack keeps float32 rounding from
    ever dropping a pixel.

    Args:
        level, spread: (n_rows, n_cols) float32 background and noise at the cell centres, counts.
        shape: (H, W) of the frame; cell: cell size in pixels; smooth: box size (odd).
        grow_level: the lowest ``snr`` that matters, > 0.
        slopes: :func:`_patch_slopes` of level and spread for ``_slope_reach(cell, smooth)``, when known.
    Returns:
        (n_rows * cell / b, n_cols * cell / b) float32 thresholds, counts: pixels whose box mean of
        counts is below their block's threshold have ``snr < grow_level``.
    """
    radius, block = smooth // 2, _screen_block(cell)
    reach = _slope_reach(cell, smooth)
    if slopes is None:
        slopes = (_patch_slopes(level, shape, cell, reach), _patch_slopes(spread, shape, cell, reach))
    per_cell = cell // block
    (n_rows, top), (n_cols, left) = _cell_layout(shape[0], cell), _cell_layout(shape[1], cell)
    # Block centres, moved inside the frame (no nearer any of the block's pixels' boxes, and the
    # slopes only hold over the frame).
    ys, xs = (np.clip(np.arange(n * per_cell) * block + (block - 1) / 2 - before, 0, size - 1)
              for n, before, size in ((n_rows, top, shape[0]), (n_cols, left, shape[1])))
    patch_r = np.clip(np.searchsorted(_cell_centres(shape[0], cell), ys, side="right") - 1, 0, max(n_rows - 2, 0))
    patch_c = np.clip(np.searchsorted(_cell_centres(shape[1], cell), xs, side="right") - 1, 0, max(n_cols - 2, 0))
    bounds = []
    for grid, slope in zip((level, spread), slopes):
        change = reach * slope[np.ix_(patch_r, patch_c)]
        near = _interpolate_lattice(grid, shape, cell, ys, xs) - change
        knots = np.repeat(np.repeat(_grid_lower_bound(grid, shape, cell, radius), per_cell, 0), per_cell, 1)
        bounds.append(np.maximum(near, knots))
    background = np.maximum(bounds[0], 0.0)
    sigma = np.maximum(np.sqrt(np.maximum(background, 1.0)), bounds[1])
    threshold = background + grow_level * sigma
    relative, absolute = _SCREEN_SLACK
    return (threshold * (1.0 - relative) - absolute).astype(np.float32)


# --- per-mask state: what a scan's gaps and dead pixels fix once -------------------------------

class _PixelState:
    """What follows from which pixels of a frame are valid, computed once per bad-pixel mask.

    A scan's module gaps and dead pixels are the same in every frame, so :class:`ClassicalFinder`
    keeps one of these and reuses it while the valid pixels stay the same. The work buffers keep
    their invariants between frames (zero where nothing is written), so they are never cleared.

    Attributes (Hp x Wp is the frame padded to whole cells, ``top``/``left`` pixels before it):
        valid: (H, W) bool valid pixels.
        n_valid: (n_rows, n_cols) int valid pixels per cell.
        invalid_cells: (n_rows * n_cols, cell * cell) bool, the invalid (or padding) pixels of each cell.
        cell_nan: flat indices into an (n_rows * n_cols, cell * cell) array of the same pixels.
        count: (Hp, Wp) float32 valid pixels in each valid pixel's box (exact small integers);
            +inf at invalid pixels and padding, so ``box_sum / count`` is 0 there.
        padded: (Hp, Wp) float32 work buffer: counts at valid pixels, 0 everywhere else.
        box_mean: (Hp, Wp) float32 work buffer: box means of the frame (see :meth:`screen`).
        invalid: (M,) int flat indices into ``padded`` of the invalid pixels inside the frame.
        excess: (H + 2r, W + 2r) float32 work buffer (r = smooth // 2), all 0 between calls.
        marks: (H + 2r, W + 2r) bool work buffer, all False between calls.
        fill_cache: which cells the empty cells (module gaps) take their values from.
    """

    def __init__(self, valid: np.ndarray, *, cell: int, smooth: int):
        h, w = valid.shape
        self.valid, self.cell, self.radius = valid, cell, smooth // 2
        (self.n_rows, self.top), (self.n_cols, self.left) = _cell_layout(h, cell), _cell_layout(w, cell)
        hp, wp = self.n_rows * cell, self.n_cols * cell
        padded_valid = np.zeros((hp, wp), bool)
        padded_valid[self.top:self.top + h, self.left:self.left + w] = valid
        cells4 = padded_valid.reshape(self.n_rows, cell, self.n_cols, cell)
        self.invalid_cells = ~cells4.transpose(0, 2, 1, 3).reshape(self.n_rows * self.n_cols, cell * cell)
        self.cell_nan = np.flatnonzero(self.invalid_cells)
        self.n_valid = cell * cell - np.bincount(self.cell_nan // (cell * cell), minlength=self.n_rows * self.n_cols)
        self.n_valid = self.n_valid.reshape(self.n_rows, self.n_cols)
        box = (2 * self.radius + 1) ** 2
        count = _box_sum_unpadded(padded_valid.view(np.uint8), self.radius, np.uint8 if box < 256 else np.int32)
        self.count = count.astype(np.float32)
        self.count[~padded_valid] = np.inf
        self.padded = np.zeros((hp, wp), np.float32)
        self.invalid = np.flatnonzero(~padded_valid[self.top:self.top + h, self.left:self.left + w])
        self.invalid = (self.invalid // w + self.top) * wp + self.invalid % w + self.left
        # Bands of whole cell rows, about 64 pixel rows (a few hundred kB): work that passes over
        # the frame several times does it band by band, in the cache.
        band = cell * max(1, 64 // cell)
        self.bands = [(b0, min(b0 + band, hp)) for b0 in range(0, hp, band)]
        self.invalid_bands = [tuple(np.searchsorted(self.invalid, (b0 * wp, b1 * wp))) for b0, b1 in self.bands]
        self.nan_bands = [tuple(np.searchsorted(self.cell_nan, (b0 * wp, b1 * wp))) for b0, b1 in self.bands]
        self.box_mean = np.zeros((hp, wp), np.float32)
        self._band = np.empty((band, wp), np.float32)
        self._cells = np.empty((self.n_rows * self.n_cols, cell * cell), np.float32)
        self.excess = np.zeros((h + 2 * self.radius, w + 2 * self.radius), np.float32)
        self.marks = np.zeros(self.excess.shape, bool)
        self.fill_cache = _FillCache()
        self._margin_marks: dict[int, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        """Memory held, bytes."""
        arrays = [getattr(self, name) for name in ("valid", "n_valid", "invalid_cells", "cell_nan", "count", "padded",
                                                   "invalid", "box_mean", "_band", "_cells", "excess", "marks")]
        return sum(a.nbytes for a in arrays) + sum(a.nbytes for a in self._margin_marks.values())

    def margin_marks(self, margin: int) -> np.ndarray:
        """(H + 2 margin, W + 2 margin) bool work buffer, all False between calls."""
        if margin not in self._margin_marks:
            h, w = self.valid.shape
            self._margin_marks = {margin: np.zeros((h + 2 * margin, w + 2 * margin), bool)}
        return self._margin_marks[margin]

    def matches(self, valid: np.ndarray, cell: int, smooth: int) -> bool:
        return (cell == self.cell and smooth // 2 == self.radius and valid.shape == self.valid.shape
                and np.array_equal(valid, self.valid))

    def load(self, frame: np.ndarray) -> np.ndarray:
        """Write a frame's valid pixels into :attr:`padded` (the rest stays 0) and return its cells.

        Returns:
            (n_rows * n_cols, cell * cell) float32 copy of the frame, cell by cell, NaN at invalid
            pixels, in a work buffer that the next load overwrites (every element: a new array
            per frame costs a frame's worth of page faults). Done a band of rows at a time, each
            cut into cells while it is in the cache.
        """
        h, w = frame.shape
        c, top, left = self.cell, self.top, self.left
        out = self._cells
        # A cell row of c values as one c * 4-byte item: the transpose moves whole rows of a cell.
        item = np.dtype((np.void, 4 * c))
        cell_rows = out.view(item).reshape(self.n_rows, self.n_cols, c)
        frame_rows = self.padded.view(item).reshape(self.n_rows, c, self.n_cols)
        padded_flat, out_flat = self.padded.reshape(-1), out.reshape(-1)
        for (b0, b1), (i0, i1), (n0, n1) in zip(self.bands, self.invalid_bands, self.nan_bands):
            f0, f1 = max(b0 - top, 0), min(b1 - top, h)
            if f1 > f0:
                self.padded[f0 + top:f1 + top, left:left + w] = frame[f0:f1]
            padded_flat[self.invalid[i0:i1]] = 0.0
            r0, r1 = b0 // c, b1 // c
            cell_rows[r0:r1] = frame_rows[r0:r1].transpose(0, 2, 1)
            out_flat[self.cell_nan[n0:n1]] = np.nan
        return out

    def some_cells(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), cell * cell) float32 copy of the loaded frame's cells ``ids`` (flat), NaN where invalid."""
        c = self.cell
        rows, cols = np.divmod(ids, self.n_cols)
        out = self.padded.reshape(self.n_rows, c, self.n_cols, c)[rows, :, cols, :].reshape(len(ids), c * c)
        np.copyto(out, np.float32(np.nan), where=self.invalid_cells[ids])
        return out

    def screen(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Box means of the loaded frame, and the pixels whose box mean reaches their block's threshold.

        Writes :attr:`box_mean` ((Hp, Wp) float32 mean over the valid pixels of each pixel's box, 0
        at invalid pixels), a band of rows at a time while it is in the cache.

        Args:
            thresholds: float32 per block of pixels, from :func:`candidate_thresholds`.
        Returns:
            Rows and cols of the pixels reaching the threshold, in raster order.
        """
        block, rad, width = _screen_block(self.cell), self.radius, self.padded.shape[1]
        per_row = np.repeat(thresholds, block, axis=1)
        found = []
        for b0, b1 in self.bands:
            rows = self._band[:b1 - b0]
            _axis_box_sum(self.padded, b0, b1, rad, rows)
            out = self.box_mean[b0:b1]
            if rad == 1 and width >= 3:  # the common case in two operations, then the two edge columns
                np.add(rows[:, :-2], rows[:, 1:-1], out=out[:, 1:-1])
                out[:, 1:-1] += rows[:, 2:]
                np.add(rows[:, 0], rows[:, 1], out=out[:, 0])
                np.add(rows[:, -2], rows[:, -1], out=out[:, -1])
            else:
                _axis_box_sum(rows.T, 0, width, rad, out.T)
            out /= self.count[b0:b1]
            hits = out.reshape(-1, block, width) >= per_row[b0 // block:b1 // block, None, :]
            found.append(np.flatnonzero(hits) + b0 * width)
        pr, pc = np.divmod(np.concatenate(found), width)
        return pr - self.top, pc - self.left


def _axis_box_sum(values: np.ndarray, r0: int, r1: int, radius: int, out: np.ndarray) -> None:
    """``out[i] = sum(values[r0 + i + d] for |d| <= radius)`` for rows r0 .. r1 - 1, rows outside ``values`` being 0."""
    h = values.shape[0]
    if radius == 1 and r0 >= 1 and r1 + 1 <= h:  # the common case in two operations
        np.add(values[r0 - 1:r1 - 1], values[r0:r1], out=out)
        out += values[r0 + 1:r1 + 1]
        return
    np.copyto(out, values[r0:r1])
    for d in range(1, radius + 1):
        lo = max(r0, d)  # rows that have a row d above them
        out[lo - r0:] += values[lo - d:r1 - d]
        hi = min(r1, h - d)  # rows that have a row d below them
        out[:hi - r0] += values[r0 + d:hi + d]


def _box_sum_unpadded(values: np.ndarray, radius: int, dtype: np.dtype | type | None = None) -> np.ndarray:
    """Sum over the (2 radius + 1)^2 box around each pixel, zero outside the array: (H, W) -> (H, W).

    Shifted-slice additions, rows first, in ``dtype`` (default: that of ``values``): no padded
    copy, several times faster than ``ndimage.uniform_filter`` for small boxes.
    """
    values = values.astype(dtype or values.dtype, copy=False)
    if radius == 0:
        return values.copy()
    rows = np.empty_like(values)
    np.add(values[1:], values[:-1], out=rows[1:])
    rows[:1] = values[:1]
    rows[:-1] += values[1:]
    for d in range(2, radius + 1):
        rows[d:] += values[:-d]
        rows[:-d] += values[d:]
    out = np.empty_like(values)
    np.add(rows[:, 1:], rows[:, :-1], out=out[:, 1:])
    out[:, :1] = rows[:, :1]
    out[:, :-1] += rows[:, 1:]
    for d in range(2, radius + 1):
        out[:, d:] += rows[:, :-d]
        out[:, :-d] += rows[:, d:]
    return out


# --- sparse segmentation -------------------------------------------------------------------------

class _Pixels(NamedTuple):
    """Exact per-pixel quantities at a set of pixels, all (K,): int rows and cols, float32 others."""

    r: np.ndarray
    c: np.ndarray
    snr: np.ndarray  # box-averaged excess / sigma
    excess: np.ndarray  # counts - background
    sigma: np.ndarray  # background noise, counts


def _refine(state: _PixelState, grid: _CellGrid, rows: tuple[np.ndarray, np.ndarray], r: np.ndarray, c: np.ndarray,
            *, smooth: int, grow_level: float, slopes: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Which of the screened pixels (r, c) can still reach ``snr >= grow_level``: (K,) bool.

    The thresholds of :func:`candidate_thresholds` hold for a whole block of pixels and their
    boxes, which on a steep background (a strong solvent ring) leaves many pixels in. Here each
    pixel gets its own bound: its exact background and spread less what they can change over its
    box (:func:`_patch_slopes`, ``slopes`` for level and spread), with the same slack against rounding.
    """
    (h, w), cell, (n_rows, n_cols) = grid.shape, grid.cell, grid.level.shape
    patch_r = np.minimum(_interpolation_index(h, cell, n_rows)[0][r], max(n_rows - 2, 0))
    patch_c = np.minimum(_interpolation_index(w, cell, n_cols)[0][c], max(n_cols - 2, 0))
    radius = smooth // 2
    level = _interpolate_at(rows[0], grid.shape, cell, r, c) - radius * slopes[0][patch_r, patch_c]
    spread = _interpolate_at(rows[1], grid.shape, cell, r, c) - radius * slopes[1][patch_r, patch_c]
    background = np.maximum(level, 0.0)
    threshold = background + grow_level * np.maximum(np.sqrt(np.maximum(background, 1.0)), spread)
    relative, absolute = _SCREEN_SLACK
    return state.box_mean[r + state.top, c + state.left] >= threshold * (1.0 - relative) - absolute


def _snr_at(frame: np.ndarray, state: _PixelState, grid: _CellGrid, r: np.ndarray, c: np.ndarray,
            rows: tuple[np.ndarray, np.ndarray] | None = None) -> _Pixels:
    """``snr``, excess and sigma at valid pixels (r, c), bit-identical to the full-frame formulas.

    The full-frame version: ``excess = frame - background`` (0 at invalid pixels), summed over a
    zero-padded box along rows then along columns, divided by the box's valid-pixel count and by
    sigma, all in float32. Here the excess is computed only on the boxes around (r, c), scattered
    into ``state.excess`` and gathered back in the same order of additions. ``rows``: the grid's
    level and spread interpolated along rows (:func:`_interpolate_rows`), when already known.
    """
    h, w = frame.shape
    rad = state.radius
    width = w + 2 * rad
    if rows is None:
        rows = (_interpolate_rows(grid.level, h, grid.cell), _interpolate_rows(grid.spread, h, grid.cell))
    rows_level, rows_spread = rows
    centre = (r + rad) * width + (c + rad)
    excess_buffer = state.excess.reshape(-1)
    needed, nr, nc = _square_neighbourhood(state.marks.reshape(-1), centre, rad, width, (h, w))
    keep = state.valid[nr, nc]
    needed, nr, nc = needed[keep], nr[keep], nc[keep]
    background = np.maximum(_interpolate_at(rows_level, (h, w), grid.cell, nr, nc), 0.0)
    excess_buffer[needed] = frame[nr, nc] - background
    total = None
    steps = np.arange(-rad, rad + 1)
    for dc in steps:  # the same order of float32 additions as the full-frame box sum
        column = excess_buffer[centre + (-rad * width + dc)]
        for dr in steps[1:]:
            column += excess_buffer[centre + (dr * width + dc)]
        total = column if total is None else total + column
    excess = excess_buffer[centre]
    excess_buffer[needed] = 0.0
    background = np.maximum(_interpolate_at(rows_level, (h, w), grid.cell, r, c), 0.0)
    sigma = np.maximum(np.sqrt(np.maximum(background, 1.0)), _interpolate_at(rows_spread, (h, w), grid.cell, r, c))
    count = state.count[r + state.top, c + state.left]
    total /= np.maximum(count, np.float32(0.5))
    total /= sigma
    return _Pixels(r, c, total, excess, sigma.astype(np.float32))


def _components(r: np.ndarray, c: np.ndarray, width: int) -> tuple[int, np.ndarray]:
    """8-connected components of a set of pixels.

    Args:
        r, c: (K,) int pixel coordinates in raster order (row by row, columns ascending).
        width: frame width W.
    Returns:
        (number of components, (K,) int component of each pixel), components numbered from 0 in
        raster order of their first pixel, as ``scipy.ndimage.label`` numbers them.
    """
    n = len(r)
    if n == 0:
        return 0, np.zeros(0, np.intp)
    top, left = int(r[0]), int(c.min())
    box = (int(r[-1]) - top + 1, int(c.max()) - left + 1)
    if box[0] * box[1] <= 16 * n + 2**16:  # pixels close together: label their bounding box
        image = np.zeros(box, bool)
        image[r - top, c - left] = True
        labels, count = ndimage.label(image, structure=np.ones((3, 3), bool))
        return count, labels[r - top, c - left].astype(np.intp) - 1
    # Scattered over a large frame: a graph of the pixels and their neighbours.
    stride = width + 2  # a guard column: c - 1 and c + 1 never alias a pixel of the next/previous row
    key = r.astype(np.int64) * stride + c
    east = np.flatnonzero(key[1:] == key[:-1] + 1)
    sources, targets = [east], [east + 1]
    for step in (stride - 1, stride, stride + 1):  # south-west, south, south-east
        wanted = key + step
        pos = np.minimum(np.searchsorted(key, wanted), n - 1)
        hit = key[pos] == wanted
        sources.append(np.flatnonzero(hit))
        targets.append(pos[hit])
    sources, targets = np.concatenate(sources), np.concatenate(targets)
    graph = coo_matrix((np.ones(len(sources)), (sources, targets)), shape=(n, n)).tocsr()
    n_components, labels = connected_components(graph, directed=False)
    first = np.full(n_components, n, np.intp)
    np.minimum.at(first, labels, np.arange(n))
    rank = np.empty(n_components, np.intp)
    rank[np.argsort(first, kind="stable")] = np.arange(n_components)
    return n_components, rank[labels]


class _Segmentation(NamedTuple):
    """Peaks of one background pass, as pixel lists in raster order."""

    grid: _CellGrid  # the background model
    thresholds: np.ndarray | None  # float32 candidate threshold per block of pixels (None: every valid pixel)
    screened: tuple[np.ndarray, np.ndarray]  # rows and cols of the pixels that passed the block thresholds
    candidates: _Pixels  # those that also passed their own bound (:func:`_refine`)
    region: _Pixels  # the K candidates with snr >= grow level
    component: np.ndarray  # (K,) int component of each region pixel
    kept: np.ndarray  # (N,) int components that are peaks, ascending


def _rescreen(box_mean: np.ndarray, thresholds: np.ndarray, state: _PixelState,
              previous: _Segmentation) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`_PixelState.screen` with new thresholds, screening again only the blocks whose threshold changed.

    Blocks whose threshold is unchanged keep the pixels screened before, which are the same pixels.
    """
    size, width = _screen_block(state.cell), state.n_cols * state.cell
    old_r, old_c = previous.screened
    changed = thresholds != previous.thresholds
    keep = ~changed[(old_r + state.top) // size, (old_c + state.left) // size]
    rows, cols = np.nonzero(changed)
    blocks = box_mean.reshape(thresholds.shape[0], size, thresholds.shape[1], size)[rows, :, cols, :]
    block, within = np.divmod(np.flatnonzero(blocks >= thresholds[rows, cols][:, None, None]), size * size)
    i, j = np.divmod(within, size)
    r = np.concatenate([old_r[keep], rows[block] * size + i - state.top])
    c = np.concatenate([old_c[keep], cols[block] * size + j - state.left])
    order = np.argsort(r.astype(np.int64) * width + c, kind="stable")
    return r[order], c[order]


def _segment(
    frame: np.ndarray, state: _PixelState, grid: _CellGrid, *,
    k_sigma: float, grow_level: float, min_area: int, smooth: int, previous: _Segmentation | None = None,
) -> _Segmentation:
    """Seeds, hysteresis growth and the size test for one background model, on candidate pixels only.

    ``previous``: the segmentation of the same frame with another background model: only the
    cells whose candidate threshold changed are screened again.
    """
    thresholds = None
    if grow_level > 0:
        reach = _slope_reach(grid.cell, smooth)  # covers the pixels' own boxes too (the slopes are per pixel)
        slopes = (_patch_slopes(grid.level, frame.shape, grid.cell, reach),
                  _patch_slopes(grid.spread, frame.shape, grid.cell, reach))
        thresholds = candidate_thresholds(grid.level, grid.spread, frame.shape, cell=grid.cell, smooth=smooth,
                                          grow_level=grow_level, slopes=slopes)
        if previous is not None and previous.thresholds is not None:
            r, c = _rescreen(state.box_mean, thresholds, state, previous)
        else:
            r, c = state.screen(thresholds)
        rows = (_interpolate_rows(grid.level, frame.shape[0], grid.cell),
                _interpolate_rows(grid.spread, frame.shape[0], grid.cell))
        keep = _refine(state, grid, rows, r, c, smooth=smooth, grow_level=grow_level, slopes=slopes)
        candidates = _snr_at(frame, state, grid, r[keep], c[keep], rows)
    else:  # every valid pixel can be part of the region
        r, c = np.nonzero(state.valid)
        candidates = _snr_at(frame, state, grid, r, c)
    inside = candidates.snr >= grow_level
    region = _Pixels(*(a[inside] for a in candidates))
    n_components, component = _components(region.r, region.c, frame.shape[1])
    kept = np.zeros(0, np.intp)
    if n_components:
        has_seed = np.bincount(component[region.snr >= k_sigma], minlength=n_components) > 0
        support = np.bincount(component[region.excess >= grow_level * region.sigma], minlength=n_components)
        kept = np.flatnonzero(has_seed & (support >= min_area))
    return _Segmentation(grid, thresholds, (r, c), candidates, region, component, kept)


def _excluded_pixels(seg: _Segmentation, margin: int, marks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and cols of the peaks' pixels dilated by a (2 margin + 1)^2 square, inside the frame, in raster order.

    ``marks``: (H + 2 margin, W + 2 margin) bool work buffer, all False (and left so).
    """
    is_peak = np.zeros(int(seg.component.max()) + 1, bool)
    is_peak[seg.kept] = True
    on_peak = is_peak[seg.component]
    r, c = seg.region.r[on_peak], seg.region.c[on_peak]
    if margin <= 0:
        return r, c
    width = marks.shape[1]
    h, w = marks.shape[0] - 2 * margin, width - 2 * margin
    centre = (r + margin) * width + (c + margin)
    _, rr, cc = _square_neighbourhood(marks.reshape(-1), centre, margin, width, (h, w))
    return rr, cc


def _square_neighbourhood(marks: np.ndarray, centre: np.ndarray, radius: int, width: int,
                          shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pixel within a (2 radius + 1)^2 square of some centre, once each, in raster order.

    Args:
        marks: flat bool work buffer of a frame padded by ``radius`` on every side (rows of
            ``width`` = W + 2 radius), all False; left all False.
        centre: flat indices of the centres in the padded buffer; shape: (H, W) of the frame.
    Returns:
        flat indices into the padded buffer, and frame rows and cols, of the pixels inside the frame.
    """
    h, w = shape
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            marks[centre + (dr * width + dc)] = True
    flat = np.flatnonzero(marks)
    marks[flat] = False
    rows, cols = np.divmod(flat, width)
    rows -= radius
    cols -= radius
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return flat[inside], rows[inside], cols[inside]


def _grid_without(
    frame: np.ndarray, state: _PixelState, base: tuple[np.ndarray, np.ndarray, np.ndarray],
    excluded: tuple[np.ndarray, np.ndarray], *, smooth_cells: int, previous: _CellGrid,
) -> _CellGrid:
    """The background model with the excluded pixels left out, recomputing only the cells they touch.

    Args:
        base: (level, spread, n_valid) of every cell, each (n_rows * n_cols,), without exclusions.
        excluded: rows and cols of the pixels to leave out (repeats allowed).
        previous: the model before (see :func:`_smooth_grid`).
    """
    cell = state.cell
    pr, pc = excluded[0] + state.top, excluded[1] + state.left
    cell_id = (pr // cell) * state.n_cols + pc // cell
    touched_mask = np.zeros(state.n_rows * state.n_cols, bool)
    touched_mask[cell_id] = True
    touched = np.flatnonzero(touched_mask)
    slot = np.zeros(len(touched_mask), np.intp)
    slot[touched] = np.arange(len(touched))
    values = state.some_cells(touched)
    values.reshape(-1)[slot[cell_id] * (cell * cell) + (pr % cell) * cell + pc % cell] = np.nan
    level, spread, n_valid = (a.copy() for a in base)
    level[touched], spread[touched], n_valid[touched] = _cell_statistics(values, _CLIP_SIGMA, overwrite=True)
    del values

    def whole_frame() -> np.ndarray:
        valid = state.valid.copy()
        valid[excluded] = False
        return np.where(valid, frame, np.float32(np.nan)).reshape(1, -1)

    grid_shape = (state.n_rows, state.n_cols)
    return _smooth_grid(level.reshape(grid_shape), spread.reshape(grid_shape), n_valid.reshape(grid_shape),
                        shape=frame.shape, cell=cell, smooth_cells=smooth_cells, clip_sigma=_CLIP_SIGMA,
                        whole_frame=whole_frame, fill_cache=state.fill_cache, previous=previous)


# --- results -------------------------------------------------------------------------------------

def significance_to_score(significance: np.ndarray) -> np.ndarray:
    """Map peak significance (sigma, >= 0) monotonically to a score in [0, 1).

    ``score = 1 - 2 ** (-significance / 3)``: 3 sigma -> 0.5, 6 -> 0.75, 12 -> 0.94. The map does
    not depend on the detection threshold, so scores from runs with different ``k_sigma`` compare.
    """
    s = np.maximum(np.asarray(significance, dtype=np.float64), 0.0)
    return (1.0 - np.exp2(-s / SCORE_HALF_SIGNIFICANCE)).astype(np.float32)


class ClassicalResult:
    """Peaks the classical finder found in one frame.

    Attributes:
        labels: (H, W) int32 peak of each pixel: 0 = none, k + 1 = peak k (peaks never overlap).
        scores: (N,) float32 in [0, 1), see :func:`significance_to_score`; peaks by descending score.
        boxes: (N, 4) float32 (x0, y0, x1, y1), x1/y1 exclusive.
        significance: (N,) float32 highest smoothed excess in each peak, in sigma.
        masks: (N, H, W) bool, by descending score. Made from ``labels`` on first use: on an
            Eiger 4M frame with 200 peaks they take 900 MB, so use ``labels`` where it does.
        background: (H, W) float32 estimated background counts (made on first use).
        sigma: (H, W) float32 background noise in counts (made on first use).
    """

    def __init__(self, labels: np.ndarray, scores: np.ndarray, boxes: np.ndarray, significance: np.ndarray,
                 grid: _CellGrid):
        self.labels, self.scores, self.boxes, self.significance = labels, scores, boxes, significance
        self._grid = grid

    @functools.cached_property
    def masks(self) -> np.ndarray:
        h, w = self.labels.shape
        masks = np.zeros((len(self.scores), h, w), bool)
        for k, (x0, y0, x1, y1) in enumerate(self.boxes.astype(np.intp)):
            masks[k, y0:y1, x0:x1] = self.labels[y0:y1, x0:x1] == k + 1
        return masks

    @functools.cached_property
    def _background(self) -> Background:
        return _background_from_grid(self._grid)

    @property
    def background(self) -> np.ndarray:
        return self._background.background

    @property
    def sigma(self) -> np.ndarray:
        return self._background.sigma

    def __len__(self) -> int:
        return len(self.scores)

    def __repr__(self) -> str:
        return f"ClassicalResult({len(self)} peaks in a {self.labels.shape[0]} x {self.labels.shape[1]} frame)"


def _result(seg: _Segmentation, grid: _CellGrid) -> ClassicalResult:
    """Label image, scores, boxes and significance of the kept components, by descending significance."""
    h, w = grid.shape
    n = len(seg.kept)
    labels = np.zeros((h, w), np.int32)
    if n == 0:
        return ClassicalResult(labels, np.zeros(0, np.float32), np.zeros((0, 4), np.float32),
                               np.zeros(0, np.float32), grid)
    slot = np.full(int(seg.component.max()) + 1, -1, np.intp)
    slot[seg.kept] = np.arange(n)
    peak = slot[seg.component]
    on_peak = peak >= 0
    peak, region = peak[on_peak], _Pixels(*(a[on_peak] for a in seg.region))
    significance = np.full(n, -np.inf, np.float32)
    np.maximum.at(significance, peak, region.snr)
    order = np.argsort(-significance, kind="stable")  # ties keep raster order, as the label numbers do
    rank = np.empty(n, np.intp)
    rank[order] = np.arange(n)
    peak = rank[peak]
    labels[region.r, region.c] = peak + 1
    boxes = np.zeros((n, 4), np.float32)
    x0, y0 = np.full(n, w, np.intp), np.full(n, h, np.intp)
    x1, y1 = np.zeros(n, np.intp), np.zeros(n, np.intp)
    np.minimum.at(x0, peak, region.c)
    np.minimum.at(y0, peak, region.r)
    np.maximum.at(x1, peak, region.c + 1)
    np.maximum.at(y1, peak, region.r + 1)
    boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = x0, y0, x1, y1
    significance = significance[order]
    return ClassicalResult(labels, significance_to_score(significance), boxes, significance, grid)


def _find_peaks(
    frame: np.ndarray, state: _PixelState, *, k_sigma: float, grow_sigma: float | None, min_area: int, smooth: int,
    cell: int, smooth_cells: int, background_passes: int, exclusion_margin: int,
) -> ClassicalResult:
    """:func:`find_peaks_classical` on a float32 frame whose valid pixels ``state`` describes."""
    grow_level = k_sigma if grow_sigma is None else min(grow_sigma, k_sigma)
    options = dict(k_sigma=k_sigma, grow_level=grow_level, min_area=min_area, smooth=smooth)
    cells = state.load(frame)
    base = _cell_statistics(cells, _CLIP_SIGMA, n_valid=state.n_valid.reshape(-1), overwrite=True)
    del cells
    grid_shape = (state.n_rows, state.n_cols)
    grid = _smooth_grid(base[0].reshape(grid_shape), base[1].reshape(grid_shape), base[2].reshape(grid_shape),
                        shape=frame.shape, cell=cell, smooth_cells=smooth_cells, clip_sigma=_CLIP_SIGMA,
                        whole_frame=lambda: np.where(state.valid, frame, np.float32(np.nan)).reshape(1, -1),
                        fill_cache=state.fill_cache)
    seg = _segment(frame, state, grid, **options)
    for _ in range(max(background_passes, 1) - 1):
        if not seg.kept.size:
            break
        excluded = _excluded_pixels(seg, exclusion_margin, state.margin_marks(exclusion_margin))
        grid = _grid_without(frame, state, base, excluded, smooth_cells=smooth_cells, previous=seg.grid)
        seg = _segment(frame, state, grid, previous=seg, **options)
    result = _result(seg, grid)
    logger.debug("classical: %d peaks", len(result))
    return result


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
        :class:`ClassicalResult`. For many frames with the same bad pixels (a scan),
        :class:`ClassicalFinder` is faster: it does the bad-pixel work once.
    """
    frame = np.asarray(frame, dtype=np.float32)
    if frame.ndim != 2:
        raise ValueError(f"frame must be (H, W), got shape {frame.shape}")
    _check_odd("smooth", smooth)
    _check_cell(cell)
    _check_odd("smooth_cells", smooth_cells)
    state = _PixelState(_valid_pixels(frame, bad_pixels), cell=cell, smooth=smooth)
    return _find_peaks(frame, state, k_sigma=k_sigma, grow_sigma=grow_sigma, min_area=min_area, smooth=smooth,
                       cell=cell, smooth_cells=smooth_cells, background_passes=background_passes,
                       exclusion_margin=exclusion_margin)


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

    It remembers the work that depends only on a frame's valid pixels (per-cell pixel counts,
    box counts, work buffers) and reuses it for the next frame with the same valid pixels, so a
    scan's module gaps and dead pixels are dealt with once, not per frame. The memory is per
    thread (see :attr:`MAX_MASKS`, :attr:`MAX_BYTES`); the results are those of
    :func:`find_peaks_classical`.

    Args:
        config: settings; keyword overrides replace single fields, e.g. ``ClassicalFinder(k_sigma=5)``.
    """

    #: At most this many bad-pixel masks are remembered per thread (a predictor cuts a large frame
    #: into tiles, each with its own mask) ...
    MAX_MASKS = 32
    #: ... holding at most this many bytes (an Eiger 4M frame's state takes about 110 MB).
    MAX_BYTES = 256 * 2**20

    def __init__(self, config: ClassicalConfig | None = None, **overrides: float | int | str | None):
        config = config or ClassicalConfig()
        known = {f.name for f in fields(ClassicalConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown ClassicalConfig fields {sorted(unknown)}; valid: {sorted(known)}")
        self.config = replace(config, **overrides)
        self._local = threading.local()

    @property
    def name(self) -> str:
        return self.config.name

    def _state(self, valid: np.ndarray) -> _PixelState:
        """The remembered state for these valid pixels, or a new one (the least recently used ones go first)."""
        c = self.config
        states: list[_PixelState] = getattr(self._local, "states", None) or []
        for k, state in enumerate(states):
            if state.matches(valid, c.cell, c.smooth):
                states.insert(0, states.pop(k))
                return state
        state = _PixelState(valid, cell=c.cell, smooth=c.smooth)
        kept, total = [state], state.nbytes
        for old in states:  # a few masks (a predictor's tiles of one detector), within a memory budget
            if len(kept) < self.MAX_MASKS and total + old.nbytes <= self.MAX_BYTES:
                kept.append(old)
                total += old.nbytes
        self._local.states = kept
        return state

    def find(self, frame: np.ndarray, bad_pixels: np.ndarray | None = None) -> ClassicalResult:
        """Peaks of one (H, W) frame."""
        c = self.config
        frame = np.asarray(frame, dtype=np.float32)
        if frame.ndim != 2:
            raise ValueError(f"frame must be (H, W), got shape {frame.shape}")
        _check_odd("smooth", c.smooth)
        _check_cell(c.cell)
        _check_odd("smooth_cells", c.smooth_cells)
        state = self._state(_valid_pixels(frame, bad_pixels))
        return _find_peaks(frame, state, k_sigma=c.k_sigma, grow_sigma=c.grow_sigma, min_area=c.min_area,
                           smooth=c.smooth, cell=c.cell, smooth_cells=c.smooth_cells,
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

    def __getstate__(self) -> dict:
        return {"config": self.config}  # the per-thread memory is not worth shipping

    def __setstate__(self, state: dict) -> None:
        self.config = state["config"]
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"ClassicalFinder({self.config!r})"
