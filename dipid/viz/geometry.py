"""Pure geometry of the viewer and figures: outlines, colours per peak, binning, the 3D-peak summary.

NumPy and SciPy only (no plotly). Coordinates: pixel (row r, column c) is centred on x = c,
y = r, so pixel edges lie on half integers; the row axis points down, as on the detector images
users know.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from dipid.errors import DipidError
from dipid.results import Instances, ScanResult
from dipid.volume import SparseFrames, _sparse_at

__all__ = [
    "PALETTE",
    "AXIS_UNITS",
    "axis_title",
    "mask_outline",
    "label_outlines",
    "Outline",
    "block_max",
    "choose_downsample",
    "robust_maximum",
    "surface_voxels",
]

logger = logging.getLogger(__name__)

#: The frames' counts of a viewer: (F, H, W), a function slice index -> (H, W), or None (masks only).
CountsSource = np.ndarray | Callable[[int], np.ndarray] | None


#: Outline / peak colours, bright enough to read on the grey log-scaled frames.
PALETTE: tuple[str, ...] = (
    "#ff4d4d", "#3ddc84", "#4da6ff", "#ffc233", "#d77bff",
    "#00e0e0", "#ff8fd0", "#b8f02a", "#ff9244", "#a0a0ff",
)


#: Units of the motors I16 scans move (the NeXus files carry no unit on most positioners).
AXIS_UNITS: dict[str, str] = {
    **{name: "deg" for name in ("eta", "chi", "phi", "mu", "delta", "gam", "th", "tth", "kth", "kmu",
                                 "kphi", "kdelta", "kgam", "kap", "psi", "azimuth")},
    **{name: "r.l.u." for name in ("h", "k", "l", "hkl_h", "hkl_k", "hkl_l")},
    "energy": "keV",
    "frame": "index",
}


#: Peak-table columns taken as the peak's intensity, in order of preference.
_INTENSITY_COLUMNS = ("intensity", "integrated_intensity", "sum_counts")


def axis_title(axis_name: str, units: str | None = None) -> str:
    """Axis label with its unit, e.g. ``"eta (deg)"``; unknown motors get no unit."""
    unit = units if units is not None else AXIS_UNITS.get(axis_name.lower())
    return f"{axis_name} ({unit})" if unit else axis_name


def _peak_colour(peak_id: int) -> str:
    return PALETTE[(int(peak_id) - 1) % len(PALETTE)]


def mask_outline(mask: np.ndarray, *, row_offset: int = 0, col_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Outline of a (h, w) bool mask along pixel edges, as closed polylines.

    Every edge between a mask pixel and a non-mask pixel (or the border) is drawn once, so holes
    get their own loop. Straight runs are merged into one segment.

    Returns:
        (x, y): float32 arrays of column and row coordinates in pixels (pixel centres on integers,
        edges on half integers, shifted by the offsets); each loop repeats its first point and
        loops are separated by NaN. Empty arrays for an empty mask.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    inner = m[1:-1, 1:-1]
    # Sides of mask pixels that face outside, walked clockwise on screen (rows grow downward);
    # corner (i, j) is the top-left corner of pixel (i, j).
    sides = (
        (inner & ~m[:-2, 1:-1], (0, 0), (0, 1)),   # top: TL -> TR
        (inner & ~m[1:-1, 2:], (0, 1), (1, 1)),    # right: TR -> BR
        (inner & ~m[2:, 1:-1], (1, 1), (1, 0)),    # bottom: BR -> BL
        (inner & ~m[1:-1, :-2], (1, 0), (0, 0)),   # left: BL -> TL
    )
    out_edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for exposed, (dr0, dc0), (dr1, dc1) in sides:
        rr, cc = np.nonzero(exposed)
        for r, c in zip(rr.tolist(), cc.tolist()):
            out_edges.setdefault((r + dr0, c + dc0), []).append((r + dr1, c + dc1))
    if not out_edges:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)

    xs: list[float] = []
    ys: list[float] = []
    for start in sorted(out_edges):
        while out_edges.get(start):
            loop = [start]
            vertex = out_edges[start].pop()
            while vertex != start:
                loop.append(vertex)
                # Every vertex has as many sides leaving as arriving, so the walk can only end
                # where it began.
                vertex = out_edges[vertex].pop()
            loop = _drop_collinear(loop)
            if xs:
                xs.append(math.nan)
                ys.append(math.nan)
            for r, c in (*loop, loop[0]):
                xs.append(c - 0.5 + col_offset)
                ys.append(r - 0.5 + row_offset)
    return np.asarray(xs, np.float32), np.asarray(ys, np.float32)


def _drop_collinear(loop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Keep only the corners of a closed axis-aligned polygon (first point not repeated)."""
    n = len(loop)
    kept = []
    for i in range(n):
        prev, here, nxt = loop[i - 1], loop[i], loop[(i + 1) % n]
        if (here[0] - prev[0], here[1] - prev[1]) != (nxt[0] - here[0], nxt[1] - here[1]):
            kept.append(here)
    return kept or loop[:1]


@dataclass
class Outline:
    """The outline of one labelled region of a frame.

    Attributes:
        label: the region's value in the label image (1, 2, ...).
        x, y: float32 column / row coordinates of its closed loops, NaN-separated (see mask_outline).
        area: pixels in the region.
        box: (row slice, column slice) of the region's bounding box in the frame.
    """

    label: int
    x: np.ndarray
    y: np.ndarray
    area: int
    box: tuple[slice, slice]


def label_outlines(labels: np.ndarray | tuple[np.ndarray, np.ndarray], shape: tuple[int, int] | None = None
                   ) -> list[Outline]:
    """Outlines of every non-zero label of an (H, W) integer label image, in label order.

    ``labels`` may also be the image's non-zero pixels (:meth:`dipid.volume.SparseFrames.pixels`),
    with the image's ``shape``: only those pixels are visited.
    """
    if isinstance(labels, tuple):
        return _sparse_outlines(labels, shape)
    labels = np.asarray(labels)
    out = []
    for index, box in enumerate(ndimage.find_objects(labels.astype(np.int64, copy=False)), start=1):
        if box is None:
            continue
        region = labels[box] == index
        x, y = mask_outline(region, row_offset=box[0].start, col_offset=box[1].start)
        out.append(Outline(label=index, x=x, y=y, area=int(region.sum()), box=box))
    return out


def _label_runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel order grouping equal labels (raster order within each), each label's first position in
    it and the labels, ascending."""
    order = np.argsort(values, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(values[order]) != 0]) if values.size else np.zeros(0, np.intp)
    return order, starts, values[order][starts]


def _sparse_outlines(pixels: tuple[np.ndarray, np.ndarray], shape: tuple[int, int] | None) -> list[Outline]:
    """:func:`label_outlines` of a label image given as its non-zero pixels: the same outlines, each
    region made from its own pixels inside its box."""
    if shape is None:
        raise ValueError("label_outlines: the shape of the image is needed with its pixels")
    flat, values = pixels
    rows, cols = np.divmod(np.asarray(flat), shape[1])
    order, starts, labels = _label_runs(np.asarray(values))
    out = []
    for label, run in zip(labels.tolist(), np.split(order, starts[1:])):
        r, c = rows[run], cols[run]
        top, left = int(r.min()), int(c.min())
        box = (slice(top, int(r.max()) + 1), slice(left, int(c.max()) + 1))
        region = np.zeros((box[0].stop - top, box[1].stop - left), bool)
        region[r - top, c - left] = True
        x, y = mask_outline(region, row_offset=top, col_offset=left)
        out.append(Outline(label=int(label), x=x, y=y, area=int(run.size), box=box))
    return out


def _instance_outlines(instances: Instances) -> list[Outline]:
    """Outline of each instance from its cropped mask (label = instance index + 1)."""
    out = []
    for i, ((x0, y0, _, _), crop) in enumerate(zip(instances.boxes, instances.crops)):
        x, y = mask_outline(crop, row_offset=int(y0), col_offset=int(x0))
        box = (slice(int(y0), int(y0) + crop.shape[0]), slice(int(x0), int(x0) + crop.shape[1]))
        out.append(Outline(label=i + 1, x=x, y=y, area=int(np.count_nonzero(crop)), box=box))
    return out


def block_max(volume: np.ndarray, factor: int) -> np.ndarray:
    """(F, H, W) -> (F, ceil(H/factor), ceil(W/factor)): the maximum of each factor x factor block.

    Maxima (not means) so a one-pixel peak or a peak label survives the shrinking. Edge blocks
    are padded with the array's minimum.
    """
    volume = np.asarray(volume)
    if factor <= 1:
        return volume
    f, h, w = volume.shape
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    if (hp, wp) != (h, w):
        fill = volume.min() if volume.size else 0
        padded = np.full((f, hp, wp), fill, dtype=volume.dtype)
        padded[:, :h, :w] = volume
        volume = padded
    # factor strided maxima along each axis: elementwise, several times faster than a reduction
    # over the strided block axes of a 5D view (this runs on every shown 4-megapixel frame)
    rows = volume[:, 0::factor].copy()
    for i in range(1, factor):
        np.maximum(rows, volume[:, i::factor], out=rows)
    out = rows[:, :, 0::factor].copy()
    for i in range(1, factor):
        np.maximum(out, rows[:, :, i::factor], out=out)
    return out


def robust_maximum(frames: Iterable[np.ndarray], *, fraction: float = 1e-4, total: int | None = None) -> float:
    """The value exceeded by only ``fraction`` of all pixels of the frames (NaN ignored).

    Used as the top of the colour scale so isolated hot pixels do not set it; computed exactly
    from each frame's largest values, without concatenating the frames. With ``total`` (the
    number of pixels of all frames) the frames may be an iterator, visited once, and only the
    largest ``total * fraction`` values are held.
    """
    if total is None:
        frames = list(frames)
        total = sum(int(np.size(frame)) for frame in frames)
    if total == 0:
        return 0.0
    rank = max(1, int(total * fraction))
    pooled = np.zeros(0)
    for frame in frames:
        flat = np.asarray(frame).ravel()
        if pooled.size >= rank:
            # Exact shortcut: ``rank`` values >= pooled.min() are already held, so a value not above
            # it cannot change the answer. One comparison pass instead of a partition of the frame
            # (a 4-megapixel frame holds a few hundred such values).
            flat = flat[flat > pooled[0]]
        flat = flat.astype(np.float64, copy=False)
        flat = flat[np.isfinite(flat)]
        keep = min(rank, flat.size)
        if keep:
            pooled = np.concatenate([pooled, np.partition(flat, flat.size - keep)[flat.size - keep:]])
            if pooled.size > rank:  # the rank largest values so far are all the answer can need
                pooled = np.partition(pooled, pooled.size - rank)[pooled.size - rank:]
            if pooled.size >= rank:
                pooled = np.sort(pooled)  # pooled[0] is the threshold of the shortcut above
    if not pooled.size:
        return 0.0
    position = pooled.size - min(rank, pooled.size)
    return float(np.partition(pooled, position)[position])


def choose_downsample(n_frames: int, height: int, width: int, bytes_per_pixel: int, budget_bytes: int) -> int:
    """Smallest integer shrink factor for which n_frames images fit ``budget_bytes`` (at least 1)."""
    factor = 1
    while n_frames * (-(-height // factor)) * (-(-width // factor)) * bytes_per_pixel > budget_bytes:
        if factor >= max(height, width):
            break
        factor += 1
    return factor


def _frame_surface(before: np.ndarray | None, here: np.ndarray, after: np.ndarray | None) -> np.ndarray:
    """(H, W) bool: labelled pixels of ``here`` with a 6-neighbour of another label, the frames
    ``before`` and ``after`` giving the neighbours across frames (None: off the volume, 0)."""
    surface = np.zeros(here.shape, dtype=bool)
    surface[_surface_pixels(before, here, after)] = True
    return surface


def _surface_pixels(before: np.ndarray | None, here: np.ndarray, after: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the surface pixels of :func:`_frame_surface`, in raster order.

    Only the labelled pixels are visited: peaks cover a small part of a frame, and whole-frame
    shifted copies of a 4-megapixel label image cost far more than these lookups.
    """
    height, width = here.shape
    # flatnonzero of a bool image: several times faster than np.nonzero of the int labels
    rows, cols = np.divmod(np.flatnonzero(np.asarray(here).ravel() != 0), width)
    if rows.size == 0:
        return rows, cols
    values = here[rows, cols]
    surface = np.zeros(rows.size, dtype=bool)
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        # off the frame counts as label 0, which differs from every labelled pixel
        surface |= ~inside
        surface[inside] |= here[r[inside], c[inside]] != values[inside]
    for other in (before, after):
        if other is None:
            return rows, cols  # every labelled pixel of the first / last frame is on the surface
        surface |= other[rows, cols] != values
    return rows[surface], cols[surface]


def _sparse_surface(before: tuple[np.ndarray, np.ndarray] | None, here: tuple[np.ndarray, np.ndarray],
                    after: tuple[np.ndarray, np.ndarray] | None, shape: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_surface_pixels` of frames given as their non-zero pixels (``SparseFrames.pixels``),
    and the surface pixels' labels: (rows, cols, labels), in raster order."""
    height, width = shape
    flat, values = here
    rows, cols = np.divmod(flat, width)
    surface = np.zeros(rows.size, dtype=bool)
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        surface |= ~inside  # off the frame counts as label 0, which differs from every labelled pixel
        surface[inside] |= _sparse_at(here, r[inside] * width + c[inside]) != values[inside]
    for other in (before, after):
        if other is None:  # every labelled pixel of the first / last frame is on the surface
            return rows, cols, values
        surface |= _sparse_at(other, flat) != values
    return rows[surface], cols[surface], values[surface]


def _frames_with_neighbours(labels: Any) -> Iterator[tuple[int, Any, Any, Any]]:
    """(k, frame k - 1, frame k, frame k + 1) of an (F, H, W) array or FrameStack, each frame read
    once; of :class:`dipid.volume.SparseFrames`, each frame's non-zero pixels."""
    n = len(labels)
    frame = labels.pixels if isinstance(labels, SparseFrames) else labels.__getitem__
    before, here = None, (frame(0) if n else None)
    for k in range(n):
        after = frame(k + 1) if k + 1 < n else None
        yield k, before, here, after
        before, here = here, after


def surface_voxels(labels: np.ndarray) -> np.ndarray:
    """(F, H, W) bool: labelled voxels with a 6-neighbour of a different label (or off the volume).

    Drawing only these shows each 3D peak's shape with far fewer points than every voxel.
    """
    labels = np.asarray(labels)
    surface = np.zeros(labels.shape, dtype=bool)
    for k, before, here, after in _frames_with_neighbours(labels):
        surface[k] = _frame_surface(before, here, after)
    return surface


def _surface_sample(labels: Any, max_voxels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(k, rows, cols, ids) of at most ``max_voxels`` surface voxels of an (F, H, W) label array or
    FrameStack: the subset :func:`_subsample_indices` picks from all of them in (k, row, col)
    order. Two passes over the frames (count, then pick), so only the picked voxels are held."""
    sparse = isinstance(labels, SparseFrames)

    def surface(before: Any, here: Any, after: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if sparse:
            return _sparse_surface(before, here, after, labels.shape[1:])
        return (*_surface_pixels(before, here, after), None)

    counts = []
    for _, before, here, after in _frames_with_neighbours(labels):
        counts.append(int(surface(before, here, after)[0].size))
    total = int(sum(counts))
    keep = _subsample_indices(total, max_voxels)
    if keep.size < total:
        logger.info("viewer: drawing %d of %d surface voxels", keep.size, total)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    parts: list[tuple[np.ndarray, ...]] = []
    for k, before, here, after in _frames_with_neighbours(labels):
        lo, hi = np.searchsorted(keep, [starts[k], starts[k + 1]])
        if hi == lo:
            continue
        rows, cols, ids = surface(before, here, after)
        pick = keep[lo:hi] - starts[k]
        rows, cols = rows[pick], cols[pick]
        ids = here[rows, cols] if ids is None else ids[pick]
        parts.append((np.full(rows.size, k, np.int64), rows, cols, ids.astype(np.int64)))
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty
    k, rows, cols, ids = (np.concatenate(column) for column in zip(*parts))
    return k, rows, cols, ids


def _subsample_indices(n: int, max_n: int, *, seed: int = 0) -> np.ndarray:
    """Sorted random subset of range(n) of size min(n, max_n), the same on every call."""
    if n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


def _even_indices(n: int, max_n: int) -> np.ndarray:
    """At most max_n evenly spread indices of range(n), always including the first and last."""
    if n <= max_n:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_n)).astype(np.int64))


def _smallest_uint(max_value: float) -> type:
    """The narrowest unsigned integer dtype holding 0..max_value (typed arrays plotly.js reads)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise DipidError(f"value {max_value:.4g} is too large for the viewer's 32-bit images")


def _scan_axis(result: ScanResult) -> tuple[np.ndarray, str]:
    """(F,) float64 scan-axis value of each held frame, and the axis name ("frame" when unknown)."""
    values = result.held_axis_values()
    if values is not None:
        return values, result.axis_name
    frames = result.frame_numbers
    logger.warning("scan axis %r has %d values but frame %d is held; plotting frame numbers instead",
                   result.axis_name, np.size(result.axis_values), int(frames.max()))
    return frames.astype(np.float64), "frame"


def _connected_regions(labels: np.ndarray) -> np.ndarray:
    """(F, H, W) int32 ids of the 6-connected regions of ``labels != 0`` (a stand-in for 3D peaks)."""
    regions, _ = ndimage.label(np.asarray(labels) != 0)
    return regions.astype(np.int32)


def _counts_frame(counts: CountsSource, k: int) -> np.ndarray:
    frame = counts(k) if callable(counts) else counts[k]
    return np.asarray(frame)


def _peak_intensities(counts: CountsSource, peak_labels: np.ndarray) -> dict[int, float]:
    """3D peak id -> summed counts over its voxels (negative bad-pixel codes count as 0)."""
    n_ids = int(peak_labels.max(initial=0)) + 1  # an array or a FrameStack, read a frame at a time
    totals = np.zeros(n_ids)
    for k in range(peak_labels.shape[0]):
        labels = peak_labels[k]
        if not labels.any():
            continue
        frame = np.clip(_counts_frame(counts, k).astype(np.float64), 0, None)
        totals += np.bincount(labels.ravel(), weights=frame.ravel(), minlength=n_ids)[:n_ids]
    return {i: float(totals[i]) for i in range(1, n_ids)}


@dataclass
class _Peaks:
    """The 3D peaks shown: one entry per peak, in table order."""

    ids: np.ndarray            # (P,) int64
    first_frame: np.ndarray    # (P,) int64 frame numbers
    last_frame: np.ndarray
    centroid_row: np.ndarray   # (P,) float64 pixels
    centroid_col: np.ndarray
    centroid_axis: np.ndarray  # (P,) float64 scan-axis value
    voxels: np.ndarray         # (P,) int64
    intensity: np.ndarray      # (P,) float64 counts, NaN when unknown
    intensity_name: str        # "intensity" (the table's, background subtracted) or "summed counts"
    score: np.ndarray | None
    models: list[str] | None


def _peaks_from_table(table: Mapping[str, Sequence[Any]], frame_numbers: np.ndarray, axis_values: np.ndarray,
                      axis_name: str, intensity_by_id: dict[int, float]) -> _Peaks:
    missing = [c for c in ("id", "first_frame", "last_frame", "centroid_row", "centroid_col") if c not in table]
    if missing:
        raise DipidError(f"build_viewer: the peak table lacks column(s) {', '.join(missing)}; pass the dict "
                         "returned by dipid.volume.peaks_table")
    ids = np.asarray(table["id"], dtype=np.int64)
    n = ids.size

    def column(name: str, default: float = math.nan) -> np.ndarray:
        return np.asarray(table[name], dtype=np.float64) if name in table else np.full(n, default)

    # dipid.volume.peaks_table names the axis centroid after the axis ("eta", or "<name>_axis"
    # when that would clash with another column).
    axis_column = next((c for c in ("centroid_axis", f"{axis_name}_axis", axis_name) if c in table
                        and c not in ("id", "first_frame", "last_frame", "centroid_frame", "centroid_row",
                                      "centroid_col", "voxels", "score", "models", "intensity")), None)
    if axis_column is not None:
        axis = column(axis_column)
    else:
        centre_frame = column("centroid_frame")
        axis = (np.interp(centre_frame, frame_numbers, axis_values) if frame_numbers.size > 1
                else np.full(n, axis_values[0]))
    intensity_name = "summed counts"
    for name in _INTENSITY_COLUMNS:
        if name in table:
            intensity, intensity_name = column(name), "intensity"
            break
    else:
        intensity = np.asarray([intensity_by_id.get(int(i), math.nan) for i in ids], dtype=np.float64)
    models = [str(m) if not isinstance(m, (list, tuple)) else "+".join(map(str, m)) for m in table["models"]] \
        if "models" in table else None
    return _Peaks(
        ids=ids,
        first_frame=np.asarray(table["first_frame"], dtype=np.int64),
        last_frame=np.asarray(table["last_frame"], dtype=np.int64),
        centroid_row=column("centroid_row"), centroid_col=column("centroid_col"), centroid_axis=axis,
        voxels=column("voxels", 0).astype(np.int64), intensity=intensity, intensity_name=intensity_name,
        score=column("score") if "score" in table else None, models=models,
    )


def _peaks_from_volume(peak_labels: np.ndarray, frame_numbers: np.ndarray, axis_values: np.ndarray,
                       intensity_by_id: dict[int, float]) -> _Peaks:
    peak_labels = np.asarray(peak_labels)  # no peak table: measured from the whole volume
    boxes = ndimage.find_objects(peak_labels.astype(np.int64, copy=False))
    ids = np.asarray([i for i, box in enumerate(boxes, start=1) if box is not None], dtype=np.int64)
    if ids.size:
        centres = np.asarray(ndimage.center_of_mass(np.ones(peak_labels.shape), peak_labels, ids)).reshape(-1, 3)
        voxels = np.asarray(ndimage.sum_labels(np.ones(peak_labels.shape), peak_labels, ids), dtype=np.int64)
    else:
        centres, voxels = np.zeros((0, 3)), np.zeros(0, np.int64)
    slices = np.arange(frame_numbers.size)
    return _Peaks(
        ids=ids,
        first_frame=np.asarray([frame_numbers[boxes[i - 1][0].start] for i in ids], dtype=np.int64),
        last_frame=np.asarray([frame_numbers[boxes[i - 1][0].stop - 1] for i in ids], dtype=np.int64),
        centroid_row=centres[:, 1], centroid_col=centres[:, 2],
        centroid_axis=np.interp(centres[:, 0], slices, axis_values),
        voxels=voxels,
        intensity=np.asarray([intensity_by_id.get(int(i), math.nan) for i in ids], dtype=np.float64),
        intensity_name="summed counts", score=None, models=None,
    )


def _dominant_peak(peak_ids: np.ndarray) -> int:
    """The most frequent non-zero id among an instance's pixels (0 when none)."""
    ids = peak_ids[peak_ids != 0]
    return int(np.bincount(ids).argmax()) if ids.size else 0


def _join_outlines(items: list[tuple[Outline, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NaN-separated coordinates and per-point (instance, area, peak) of several outlines."""
    xs, ys, custom = [], [], []
    for outline, peak in items:
        if xs:
            xs.append(np.array([np.nan], np.float32))
            ys.append(np.array([np.nan], np.float32))
            custom.append(np.zeros((1, 3), np.int32))
        xs.append(outline.x)
        ys.append(outline.y)
        custom.append(np.tile(np.array([[outline.label - 1, outline.area, peak]], np.int32), (outline.x.size, 1)))
    if not xs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, 3), np.int32)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(custom)
