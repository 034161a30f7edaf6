"""Stacking per-frame predictions into (frame, row, col) volumes, and 3D peaks.

A reflection crossing the Ewald sphere during a rocking scan lights up several consecutive
frames. :func:`link_peaks_3d` joins the per-frame instances of a scan into 3D peaks,
:func:`peaks_table` measures each peak (centroid, background-subtracted intensity, ...) and
:func:`scan_peaks` does both for a :class:`dipid.results.ScanResult`. :func:`match_peaks_3d`
scores predicted peaks against ground truth (3D voxel IoU).

Everything here is numpy/scipy on arrays and :mod:`dipid.results` objects; no torch. The one file
this module opens is a scan, to re-read counts a result was predicted from (:func:`read_counts`,
:func:`scan_peaks` without counts); it is closed before the function returns.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dipid.errors import ScanError, ScanShapeError
from dipid.files import atomic_write_text
from dipid.results import SOURCE_FLAGS, FrameStack, Instances, ScanResult, source_names

if TYPE_CHECKING:
    from dipid.io.scan import Scan

logger = logging.getLogger(__name__)

__all__ = [
    "stack_masks",
    "stack_labels",
    "PeakLinker",
    "link_instances",
    "link_peaks_3d",
    "peaks_table",
    "Peaks3D",
    "scan_peaks",
    "match_peaks_3d",
    "to_dataframe",
    "write_peaks_csv",
    "read_counts",
    "SparseFrames",
    "instance_label_frames",
    "PEAK_COLUMNS",
]

#: Columns of :func:`peaks_table`, in order; the scan-axis centroid column (named after the axis)
#: follows ``centroid_col`` when axis values are given.
PEAK_COLUMNS = (
    "id", "first_frame", "last_frame", "n_frames", "centroid_frame", "centroid_row", "centroid_col",
    "intensity", "background", "max_counts", "voxels", "bad_voxels",
    "frame0", "row0", "col0", "frame1", "row1", "col1", "score", "models",
)

#: Counts for :func:`peaks_table`: a (F, H, W) array, a callable ``k -> (H, W)`` for stack index k,
#: or an iterable of (H, W) frames, (b, H, W) batches, ``(frames, bad)`` pairs or scan batches
#: (objects with ``.frames`` and ``.bad_pixels``), in stack order.
CountsSource = Union[np.ndarray, Callable[[int], Any], Iterable[Any]]


# ---------------------------------------------------------------------------------------------
# sparse frames


class SparseFrames(FrameStack):
    """An (F, H, W) stack held as each frame's non-zero pixels: a :class:`FrameStack` whose frames
    are also available as those pixels (:meth:`pixels`).

    Peaks and instances cover a small part of a detector frame (about 3000 of the 4.5 million
    pixels of a simulated Eiger 4M frame), so the label images of a scan's instances and peaks,
    the per-voxel scores and source flags are made as their non-zero pixels: code that needs only
    those (the peak table, the viewer's 3D voxels and outlines, the results file's non-empty
    chunks) never visits the rest of the frame. ``stack[k]`` still makes the dense (H, W) frame.

    Args:
        pixels: slice index k -> (flat indices into an (H * W) frame, ascending; their non-zero
            values).
        n_frames, frame_shape, dtype, max_value: as :class:`FrameStack`.
        keep: keep each frame's pixels once made (read-only; 8 bytes and the value per pixel), for
            a stack read several times whose frames cost more to make than to keep; else they
            are made again on every read.
    """

    def __init__(self, pixels: Callable[[int], tuple[np.ndarray, np.ndarray]], n_frames: int,
                 frame_shape: tuple[int, int], dtype: Any, *, max_value: float | None = None,
                 keep: bool = False):
        super().__init__(self._dense, n_frames, frame_shape, dtype, max_value=max_value)
        self._make = pixels
        self._kept: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if keep else None
        # flat indices as int32 when they fit: kept pixels take 8 bytes, not 12, plus the value
        self._index = np.int32 if self.shape[1] * self.shape[2] <= np.iinfo(np.int32).max else np.int64

    def pixels(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame k's non-zero pixels: (flat indices, ascending int32 or, for frames of 2**31 pixels
        or more, int64; values of the stack's dtype)."""
        k = int(k)
        if not -len(self) <= k < len(self):
            raise IndexError(f"frame {k} is outside the stack of {len(self)} frames")
        k += len(self) if k < 0 else 0
        kept = None if self._kept is None else self._kept.get(k)
        if kept is None:
            flat, values = self._make(k)
            kept = (np.asarray(flat).astype(self._index, copy=False), np.asarray(values).astype(self.dtype, copy=False))
            if self._kept is not None:
                for array in kept:
                    array.flags.writeable = False  # shared by every caller
                self._kept[k] = kept
        return kept

    def at(self, k: int, flat: np.ndarray) -> np.ndarray:
        """Frame k's values at the flat pixel indices ``flat`` (0 where it has none)."""
        return _sparse_at(self.pixels(k), np.asarray(flat))

    def _dense(self, k: int) -> np.ndarray:
        out = np.zeros(self.shape[1:], self.dtype)
        flat, values = self.pixels(k)
        out.reshape(-1)[flat] = values
        return out

    def max(self, initial: float | None = None) -> Any:
        """The largest value (``max_value`` when known, else from the non-zero pixels; 0 counts too
        when a frame has any zero pixel, as in the dense stack)."""
        if self.max_value is None:
            plane = self.shape[1] * self.shape[2]
            tops = []
            for k in range(len(self)):
                flat, values = self.pixels(k)
                if values.size:
                    tops.append(values.max())
                if flat.size < plane:
                    tops.append(self.dtype.type(0))
            if not tops:  # no frames
                return initial
            self.max_value = max(tops)
        if initial is not None:
            return max(self.max_value, initial)
        return self.max_value


def _sparse_at(pixels: tuple[np.ndarray, np.ndarray], flat: np.ndarray) -> np.ndarray:
    """Values of a sparse frame (:meth:`SparseFrames.pixels`) at the flat indices ``flat`` (0 where none)."""
    where, values = pixels
    out = np.zeros(flat.shape, values.dtype)
    if where.size:
        at = np.minimum(np.searchsorted(where, flat), where.size - 1)
        hit = where[at] == flat
        out[hit] = values[at[hit]]
    return out


def _instance_pixels(inst: Instances) -> tuple[np.ndarray, np.ndarray]:
    """Every (pixel, instance) pair of ``inst``: flat pixel indices and instance indices, instance
    by instance (a pixel of overlapping instances appears once for each)."""
    width = inst.shape[1]
    flats, owners = [], []
    for i, ((x0, y0, _, _), crop) in enumerate(zip(inst.boxes.astype(np.int64), inst.crops)):
        rows, cols = np.nonzero(crop)
        flats.append((rows + y0) * width + (cols + x0))
        owners.append(np.full(rows.size, i, np.int64))
    if not flats:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(flats), np.concatenate(owners)


def _label_pixels(inst: Instances) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero pixels of ``inst.label_image()`` (instance i labelled i + 1, the earlier instance
    where they overlap), made from the crops alone: (flat indices ascending, int32 labels)."""
    flat, owner = _instance_pixels(inst)
    # np.unique's first occurrence of a pixel is its lowest instance, the one label_image keeps
    flat, first = np.unique(flat, return_index=True)
    return flat, (owner[first] + 1).astype(np.int32)


def _reduced_pixels(inst: Instances, values: np.ndarray, reduce: np.ufunc, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero pixels of an (H, W) ``dtype`` image holding, at each pixel, ``reduce`` (a
    ufunc such as ``np.maximum``) of the ``values`` (N,) of the instances covering it, starting
    from 0: (flat indices ascending, values)."""
    flat, owner = _instance_pixels(inst)
    where, index = np.unique(flat, return_inverse=True)
    out = np.zeros(where.size, dtype)
    reduce.at(out, index, values[owner])
    nonzero = out != 0
    return where[nonzero], out[nonzero]


def _score_pixels(inst: Instances) -> tuple[np.ndarray, np.ndarray]:
    """The highest score of the instances covering each pixel, as non-zero pixels of a float32
    image: the per-voxel scores of :func:`peaks_table`."""
    return _reduced_pixels(inst, inst.scores, np.maximum, np.float32)


def _source_pixels(inst: Instances) -> tuple[np.ndarray, np.ndarray]:
    """The bitwise OR of the source flags of the instances covering each pixel, as non-zero pixels
    of a uint8 image: the per-voxel sources of :func:`peaks_table`."""
    return _reduced_pixels(inst, inst.sources, np.bitwise_or, np.uint8)


def instance_label_frames(per_frame: Sequence[Instances], frame_shape: tuple[int, int]) -> SparseFrames:
    """The (F, H, W) int32 instance label images of per-frame :class:`Instances` (each frame as
    ``Instances.label_image()``: 0 = none, i + 1 = instance i) as :class:`SparseFrames`, each frame
    made from the instances' crops when read."""
    per_frame = list(per_frame)
    return SparseFrames(lambda k: _label_pixels(per_frame[k]), len(per_frame), frame_shape, np.int32)


# ---------------------------------------------------------------------------------------------
# stacking


def stack_masks(per_frame: Sequence[Instances], frame_shape: tuple[int, int]) -> np.ndarray:
    """Union masks of consecutive frames -> (F, H, W) bool volume."""
    out = np.zeros((len(per_frame), *frame_shape), dtype=bool)
    for k, inst in enumerate(per_frame):
        for (x0, y0, x1, y1), crop in zip(inst.boxes, inst.crops):
            out[k, y0:y1, x0:x1] |= crop
    return out


def stack_labels(per_frame: Sequence[Instances], frame_shape: tuple[int, int]) -> np.ndarray:
    """Per-frame instance label images -> (F, H, W) int32 volume (0 = none, i + 1 = instance i)."""
    out = np.zeros((len(per_frame), *frame_shape), dtype=np.int32)
    for k, inst in enumerate(per_frame):
        out[k] = inst.label_image()
    return out


# ---------------------------------------------------------------------------------------------
# linking


def _cross_frame_offsets(connectivity: int) -> list[tuple[int, int]]:
    """(drow, dcol) offsets a voxel reaches in the next frame under 3D ``connectivity``.

    As in :func:`scipy.ndimage.generate_binary_structure`: a neighbour one frame on is linked when
    ``1 + |drow| + |dcol| <= connectivity``, so 1 = the same pixel only (face connectivity).
    """
    return [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if 1 + abs(dr) + abs(dc) <= connectivity]


def _touching_pairs(
    earlier: tuple[np.ndarray, np.ndarray], later: tuple[np.ndarray, np.ndarray], frame_shape: tuple[int, int],
    offsets: Sequence[tuple[int, int]],
) -> tuple[np.ndarray, np.ndarray]:
    """Instance pairs (a in ``earlier``, b in ``later``) that touch, and how many of a's pixels touch b.

    Args:
        earlier, later: the labelled pixels of two slices of ``frame_shape`` (H, W): (P,) int64
            flat pixel indices, ascending, and (P,) int64 instance ids. Only these are visited:
            peaks cover a small part of a detector frame, and whole-frame comparisons of two
            4-megapixel id images cost several times more, on every frame of a scan.
        offsets: the (drow, dcol) by which a pixel of ``earlier`` reaches ``later``.
    Returns:
        (2, P) int64 instance id pairs and (P,) int64 touching-pixel counts.
    """
    height, width = frame_shape
    (a_flat, a_ids), (b_flat, b_ids) = earlier, later
    a_rows, a_cols = np.divmod(a_flat, width)
    rows = []
    for drow, dcol in offsets:
        r, c = a_rows + drow, a_cols + dcol
        source = np.flatnonzero((r >= 0) & (r < height) & (c >= 0) & (c < width))
        target = a_flat[source] + (drow * width + dcol)  # ascending, as a_flat is
        at = np.minimum(np.searchsorted(b_flat, target), max(b_flat.size - 1, 0))
        hit = b_flat[at] == target if b_flat.size else np.zeros(target.size, bool)
        rows.append(np.stack([a_flat[source[hit]], a_ids[source[hit]], b_ids[at[hit]]]))
    if not rows:
        return np.zeros((2, 0), np.int64), np.zeros(0, np.int64)
    triples = np.concatenate(rows, axis=1)
    if len(rows) > 1:  # a pixel of a touching b through several diagonal neighbours counts once
        triples = np.unique(triples, axis=1)
    base = int(max(a_ids.max(initial=0), b_ids.max(initial=0))) + 1
    keys, touching = np.unique(triples[1] * base + triples[2], return_counts=True)
    return np.stack([keys // base, keys % base]), touching


def _check_link_options(max_gap: int, connectivity: int, min_overlap: float, min_frames: int = 1) -> None:
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}")
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")


class PeakLinker:
    """:func:`link_peaks_3d` one slice at a time, in bounded memory.

    Feed the slices in scan order with :meth:`add`; :meth:`finish` joins the instances into 3D
    peaks; :meth:`peak_frame` then gives a slice's (H, W) peak labels from its instance labels.
    Only the last ``max_gap + 1`` slices' id images are held, plus per instance its area and the
    links found (a union of instance ids, numbered into peaks at the end), so memory depends on the
    detector and the number of instances, not on the number of frames. The result is exactly that
    of :func:`link_peaks_3d` (which uses this class).

    Each slice's instances get ids unique over the scan: the slice's labels (bool masks: their
    in-frame connected components) plus the ids of all earlier slices.
    """

    def __init__(self, *, max_gap: int = 1, connectivity: int = 1, min_overlap: float = 0.5):
        _check_link_options(max_gap, connectivity, min_overlap)
        self.max_gap, self.connectivity, self.min_overlap = max_gap, connectivity, min_overlap
        self._plane = ndimage.generate_binary_structure(2, min(connectivity, 2))
        self._cross = _cross_frame_offsets(connectivity)
        #: the last max_gap + 1 slices: (frame number, labelled pixels (flat indices, ids) or None
        #: when empty, offset, areas)
        self._window: list[tuple[int, tuple[np.ndarray, np.ndarray] | None, int, np.ndarray]] = []
        self._frames: list[int] = []
        self._offsets: list[int] = []
        self._areas: list[np.ndarray] = []
        self._links: list[np.ndarray] = []
        #: instance ids handed out so far; 3D peaks found (after finish)
        self.n_ids = self.n_peaks = 0
        self._id_to_peak: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._frames)

    def _local(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) int per-slice instance labels: a bool mask's in-frame connected components, or
        integer labels as they are."""
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"a slice must be (H, W), got shape {labels.shape}")
        if labels.dtype == bool:
            return ndimage.label(labels, structure=self._plane)[0]
        if labels.min(initial=0) < 0:
            raise ValueError("instance label volume has negative labels; 0 is background, 1.. are instances")
        return labels

    def add(self, labels: np.ndarray, frame_number: int | None = None) -> None:
        """Add the next slice: (H, W) bool peak mask or integer instance labels (0 = none).

        ``frame_number``: its frame in the scan (default: the slice index); strictly ascending.
        """
        local = self._local(labels)
        # The slice as its labelled pixels (flat index, local label): the rest is background
        pixels = np.flatnonzero(local.ravel() != 0)
        self.add_pixels(pixels, local.ravel()[pixels], local.shape, frame_number)

    def add_pixels(self, pixels: np.ndarray, labels: np.ndarray, frame_shape: tuple[int, int],
                   frame_number: int | None = None) -> None:
        """:meth:`add` for a slice of integer instance labels given as its labelled pixels: (P,)
        flat indices into the (H, W) ``frame_shape``, ascending, and their (P,) labels (>= 1), e.g.
        :meth:`SparseFrames.pixels`. The same as adding the dense label image, without it."""
        if self._id_to_peak is not None:
            raise RuntimeError("PeakLinker.add after finish(): make a new linker for another scan")
        frame = len(self._frames) if frame_number is None else int(frame_number)
        if self._frames and frame <= self._frames[-1]:
            raise ValueError(f"frame numbers must be strictly ascending: {frame} after {self._frames[-1]}")
        pixels = np.asarray(pixels, np.int64)
        local_ids = np.asarray(labels).astype(np.int64)
        if local_ids.min(initial=1) < 1:
            raise ValueError("instance label volume has negative labels; 0 is background, 1.. are instances")
        n_local = int(local_ids.max(initial=0))
        if self.n_ids + n_local >= np.iinfo(np.int32).max:
            raise ValueError("too many instances to number with int32")
        self._frames.append(frame)
        self._offsets.append(self.n_ids)
        area = np.bincount(local_ids, minlength=n_local + 1)[1:].astype(np.int64)
        self._areas.append(area)
        current = (pixels, local_ids + self.n_ids) if n_local else None
        if current is not None:
            for prev_frame, prev, prev_offset, prev_area in self._window:
                distance = frame - prev_frame
                if prev is None or distance > self.max_gap + 1:
                    continue
                # one frame apart: the connectivity's cross-frame neighbours; a bridged gap: the same pixel
                offsets = self._cross if distance == 1 else [(0, 0)]
                pairs, touching = _touching_pairs(prev, current, tuple(frame_shape), offsets)
                smaller = np.minimum(prev_area[pairs[0] - prev_offset - 1], area[pairs[1] - self.n_ids - 1])
                keep = touching >= self.min_overlap * smaller
                self._links.append(pairs[:, keep])
        self._window.append((frame, current, self.n_ids, area))
        del self._window[:-(self.max_gap + 1)]
        self.n_ids += n_local

    def finish(self, *, min_frames: int = 1) -> np.ndarray:
        """Join the instances into 3D peaks; returns (n_ids + 1,) int32: instance id -> peak
        (0 = none), peaks numbered 1..n by first appearance. Peaks in fewer than ``min_frames``
        slices are dropped."""
        if min_frames < 1:
            raise ValueError(f"min_frames must be >= 1, got {min_frames}")
        self._window = []
        n_ids = self.n_ids
        id_to_peak = np.zeros(n_ids + 1, dtype=np.int32)
        if n_ids:
            area = np.concatenate([np.zeros(1, np.int64), *self._areas])
            links = np.concatenate(self._links, axis=1) if self._links else np.zeros((2, 0), np.int64)
            graph = coo_matrix((np.ones(links.shape[1], np.int8), (links[0], links[1])), shape=(n_ids + 1, n_ids + 1))
            _, component = connected_components(graph, directed=False)
            # Number peaks by first appearance: ids already run slice by slice in raster order.
            present = np.flatnonzero(area[1:]) + 1
            if min_frames > 1:
                ends = np.asarray(self._offsets, np.int64) + np.asarray([a.size for a in self._areas], np.int64)
                slice_of = np.searchsorted(ends, present)
                peak_slices = np.unique(np.stack([component[present], slice_of]), axis=1)
                n_slices = np.bincount(peak_slices[0], minlength=component.max() + 1)
                present = present[n_slices[component[present]] >= min_frames]
            comps_in_order, first = np.unique(component[present], return_index=True)
            rank = np.zeros(component.max() + 1, dtype=np.int32)
            rank[comps_in_order[np.argsort(first)]] = np.arange(1, len(comps_in_order) + 1, dtype=np.int32)
            id_to_peak[present] = rank[component[present]]
        self._id_to_peak = id_to_peak
        self.n_peaks = int(id_to_peak.max(initial=0))
        return id_to_peak

    @property
    def frame_numbers(self) -> np.ndarray:
        """(F,) int64 frame number of each slice added."""
        return np.asarray(self._frames, dtype=np.int64)

    def peak_frame(self, k: int, labels: np.ndarray) -> np.ndarray:
        """(H, W) int32 3D peak labels of slice k (after :meth:`finish`), from the same labels
        that were added for it."""
        if self._id_to_peak is None:
            raise RuntimeError("PeakLinker.peak_frame before finish()")
        local = self._local(labels)
        # Only the labelled pixels are looked up (a small part of a detector frame): a gather over
        # all 4 million pixels of an Eiger frame costs several times more, on every frame read.
        where = np.flatnonzero(local.ravel() != 0)  # of a bool image: several times faster than of the ints
        peaks = np.zeros(local.shape, dtype=np.int32)
        peaks.ravel()[where] = self._id_to_peak[local.ravel()[where].astype(np.int64) + self._offsets[k]]
        return peaks

    def peak_pixels(self, k: int, pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`peak_frame` as its labelled pixels, from slice k's labelled pixels as given to
        :meth:`add_pixels`: (flat indices, ascending int64; int32 3D peak ids >= 1)."""
        if self._id_to_peak is None:
            raise RuntimeError("PeakLinker.peak_pixels before finish()")
        peaks = self._id_to_peak[np.asarray(labels).astype(np.int64) + self._offsets[k]]
        linked = peaks != 0
        return np.asarray(pixels, np.int64)[linked], peaks[linked]

    def peak_labels(self, label_of: Callable[[int], np.ndarray], frame_shape: tuple[int, int]) -> FrameStack:
        """The (F, H, W) 3D peak labels as a :class:`FrameStack` (after :meth:`finish`): slice k
        made from ``label_of(k)``, the labels added for it."""
        if self._id_to_peak is None:
            raise RuntimeError("PeakLinker.peak_labels before finish()")
        return FrameStack(lambda k: self.peak_frame(k, label_of(k)), len(self), frame_shape, np.int32,
                          max_value=self.n_peaks)

    def peak_label_pixels(self, pixels_of: Callable[[int], tuple[np.ndarray, np.ndarray]],
                          frame_shape: tuple[int, int]) -> SparseFrames:
        """:meth:`peak_labels` as :class:`SparseFrames`, slice k made from ``pixels_of(k)``, the
        labelled pixels added for it with :meth:`add_pixels`."""
        if self._id_to_peak is None:
            raise RuntimeError("PeakLinker.peak_label_pixels before finish()")
        # kept: the peak labels are read by the table, the viewer and the results file
        return SparseFrames(lambda k: self.peak_pixels(k, *pixels_of(k)), len(self), frame_shape, np.int32,
                            max_value=self.n_peaks, keep=True)


def link_instances(
    per_frame: Sequence[Instances],
    frame_numbers: Sequence[int] | np.ndarray,
    frame_shape: tuple[int, int],
    *,
    max_gap: int = 1,
    connectivity: int = 1,
    min_overlap: float = 0.5,
    min_frames: int = 1,
) -> FrameStack:
    """:func:`link_peaks_3d` of per-frame :class:`Instances`, in bounded memory: the (F, H, W) int32
    peak labels as :class:`SparseFrames`, made from the instances' labelled pixels (as in their
    label images) without a full-frame image. Options as in :func:`link_peaks_3d`."""
    linker = PeakLinker(max_gap=max_gap, connectivity=connectivity, min_overlap=min_overlap)
    labels = instance_label_frames(per_frame, frame_shape)
    for k, (_, frame) in enumerate(zip(per_frame, frame_numbers)):
        linker.add_pixels(*labels.pixels(k), frame_shape, int(frame))
    linker.finish(min_frames=min_frames)
    return linker.peak_label_pixels(labels.pixels, frame_shape)


def link_peaks_3d(
    instances: np.ndarray | Sequence[Instances],
    *,
    max_gap: int = 1,
    connectivity: int = 1,
    min_overlap: float = 0.5,
    min_frames: int = 1,
    frame_numbers: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Join per-frame peak instances into 3D peaks: connected components over (frame, row, col).

    Each per-frame instance is a node. Two instances in consecutive frames are joined when they
    touch (share a pixel; with ``connectivity`` > 1 a diagonal neighbour one frame on also
    touches) on at least ``min_overlap`` of the smaller one's pixels. Instances up to
    ``max_gap + 1`` frames apart are joined by the same rule on shared pixels, which bridges a
    peak briefly missed by the finder (a gap only ever links a pixel to itself, so peaks whose
    footprints do not overlap are never bridged; two distinct peaks on the same pixels at most
    ``max_gap`` frames apart do merge: lower ``max_gap`` for scans with such peaks). Instances
    of one frame are never joined to each other directly, so two touching instances of an
    integer label volume stay apart unless other frames join them.

    ``min_overlap=0`` gives plain connected components (a single shared pixel joins). The
    default 0.5 keeps apart a small peak that appears at the edge of a larger one; a peak that
    appears entirely inside a larger one's previous footprint still merges with it. See
    benchmarks/peaks3d.py for its effect on simulated scans.

    The slices are linked one at a time (:class:`PeakLinker`); a long scan is better linked with
    that class directly, which needs no (F, H, W) volume in or out.

    Args:
        instances: (F, H, W) bool peak masks (instances = in-frame connected components), or
            (F, H, W) integer per-frame instance labels (0 = background, ids may repeat between
            frames, e.g. :meth:`ScanResult.label_volume`), or F :class:`Instances`.
        max_gap: largest number of consecutive missing frames bridged (0 = no bridging).
        connectivity: 1 = face neighbours only (default: peaks touching only diagonally stay
            apart), 2 = also edge diagonals, 3 = all 26 neighbours (scipy.ndimage's meaning).
        min_overlap: fraction in [0, 1] of the smaller instance's pixels that must touch the
            other for two instances in different frames to be joined.
        min_frames: peaks found in fewer slices than this are dropped (a reflection of a
            rocking scan usually spans several frames; most single-frame peaks of the classical
            finder on simulated scans are noise).
        frame_numbers: (F,) ascending frame number of each slice, when the stack skips frames;
            slices further apart than ``max_gap + 1`` frames are never joined.
    Returns:
        (F, H, W) int32 peak labels: 0 = background, 1..n numbered by first appearance.
    """
    _check_link_options(max_gap, connectivity, min_overlap, min_frames)
    if isinstance(instances, np.ndarray):
        volume = instances
        if volume.ndim != 3:
            raise ValueError(f"instances must be an (F, H, W) volume, got shape {volume.shape}")

        def slice_labels(k: int) -> np.ndarray:
            return volume[k]
        n_frames, frame_shape = len(volume), volume.shape[1:]
    else:
        per_frame = list(instances)
        if not per_frame:
            raise ValueError("no frames to link: pass an (F, H, W) volume to link an empty stack")

        def slice_labels(k: int) -> np.ndarray:
            return per_frame[k].label_image()
        n_frames, frame_shape = len(per_frame), per_frame[0].shape
    frames = np.arange(n_frames) if frame_numbers is None else np.asarray(frame_numbers, dtype=np.int64)
    if frames.shape != (n_frames,) or np.any(np.diff(frames) <= 0):
        raise ValueError(f"frame_numbers must be {n_frames} strictly ascending numbers")

    linker = PeakLinker(max_gap=max_gap, connectivity=connectivity, min_overlap=min_overlap)
    for k in range(n_frames):
        linker.add(slice_labels(k), int(frames[k]))
    linker.finish(min_frames=min_frames)
    return np.asarray(linker.peak_labels(slice_labels, frame_shape))


# ---------------------------------------------------------------------------------------------
# measuring


def _as_frame_iterator(source: CountsSource, n_frames: int, what: str) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(values (H, W), bad (H, W) bool or None)`` for stack indices 0..n_frames-1."""

    def split(item: Any) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        if hasattr(item, "frames"):
            frames, bad = np.asarray(item.frames), getattr(item, "bad_pixels", None)
        elif isinstance(item, tuple) and len(item) == 2:
            frames, bad = np.asarray(item[0]), item[1]
        else:
            frames, bad = np.asarray(item), None
        if frames.ndim == 2:
            yield frames, None if bad is None else np.asarray(bad, bool)
        elif frames.ndim == 3:
            for b in range(len(frames)):
                yield frames[b], None if bad is None else np.asarray(bad[b], bool)
        else:
            raise ValueError(f"{what}: expected (H, W) frames or (b, H, W) batches, got shape {frames.shape}")

    if isinstance(source, np.ndarray):
        if source.ndim != 3 or len(source) != n_frames:
            raise ScanShapeError(f"{what} must be ({n_frames}, H, W) like the peak labels, got shape {source.shape}")
        yield from ((source[k], None) for k in range(n_frames))
        return
    if callable(source):
        for k in range(n_frames):
            yield from split(source(k))
        return
    produced = 0
    for item in source:
        for frame in split(item):
            if produced == n_frames:
                raise ScanShapeError(f"{what} gave more frames than the {n_frames} of the peak labels")
            produced += 1
            yield frame
    if produced != n_frames:
        raise ScanShapeError(f"{what} gave {produced} frames; the peak labels have {n_frames}")


def _frame_values(source: np.ndarray | Callable[[int], Any] | None, n_frames: int, what: str, shape: tuple[int, ...]
                  ) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray] | None]:
    """Each frame of ``source``: an (H, W) array, the non-zero pixels of :class:`SparseFrames`, or None."""
    if source is None:
        return iter([None] * n_frames)
    if isinstance(source, SparseFrames):
        if source.shape != shape:
            raise ScanShapeError(f"{what} must be {shape} like the peak labels, got shape {source.shape}")
        return (source.pixels(k) for k in range(n_frames))
    return (values for values, _ in _as_frame_iterator(source, n_frames, what))


def _values_at(frame: np.ndarray | tuple[np.ndarray, np.ndarray], flat: np.ndarray) -> np.ndarray:
    """A frame's values at flat pixel indices; ``frame`` dense, or the pixels of a sparse one."""
    return _sparse_at(frame, flat) if isinstance(frame, tuple) else np.asarray(frame).ravel()[flat]


class _GoodPixels:
    """The pixels of a frame that count (finite, non-negative, in no bad-pixel mask), worked out
    only where asked: around the peaks, a small part of a detector frame."""

    def __init__(self, values: np.ndarray, masks: Sequence[np.ndarray | None]):
        self.values = values
        self.masks = [np.broadcast_to(np.asarray(m, dtype=bool), values.shape) for m in masks if m is not None]

    @staticmethod
    def _good(values: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
        bad = ~np.isfinite(values) | (values < 0)
        for mask in masks:
            bad |= mask
        return ~bad

    def crop(self, rows: slice, cols: slice) -> np.ndarray:
        return self._good(self.values[rows, cols], [m[rows, cols] for m in self.masks])

    def at(self, flat: np.ndarray) -> np.ndarray:
        return self._good(self.values.ravel()[flat], [m.reshape(-1)[flat] for m in self.masks])


def _ring_background(
    labels: np.ndarray, counts: np.ndarray, good: _GoodPixels, peak: int, where: tuple[slice, slice], annulus: int
) -> float | None:
    """Median of good, peak-free pixels within ``annulus`` pixels of peak ``peak``'s footprint; None if none."""
    height, width = labels.shape
    rows = slice(max(where[0].start - annulus, 0), min(where[0].stop + annulus, height))
    cols = slice(max(where[1].start - annulus, 0), min(where[1].stop + annulus, width))
    crop = labels[rows, cols]
    footprint = crop == peak
    near = ndimage.binary_dilation(footprint, structure=np.ones((3, 3), bool), iterations=annulus)
    ring = near & (crop == 0) & good.crop(rows, cols)
    if not ring.any():
        return None
    return float(np.median(counts[rows, cols][ring].astype(np.float64)))  # float32 frames: as exact as before


def peaks_table(
    peak_labels: np.ndarray | FrameStack,
    counts: CountsSource,
    *,
    frame_numbers: Sequence[int] | np.ndarray | None = None,
    axis_values: Sequence[float] | np.ndarray | None = None,
    axis_name: str = "frame",
    scores: np.ndarray | Callable[[int], np.ndarray] | None = None,
    sources: np.ndarray | Callable[[int], np.ndarray] | None = None,
    bad_pixels: np.ndarray | Callable[[int], np.ndarray] | None = None,
    background_annulus: int = 3,
) -> dict[str, Any]:
    """Measure each 3D peak of a peak-label volume: one row per peak.

    Frames are visited one at a time, so ``peak_labels`` may be a FrameStack and ``counts`` (and
    ``scores``, ``sources``, ``bad_pixels``) callables or iterators: a long scan never needs to be
    in memory.

    Background: in every frame, the median of the pixels within ``background_annulus`` pixels of
    the peak's footprint that belong to no peak and are not bad (the frame's median peak-free
    pixel when that ring is empty). ``intensity`` = sum over the peak's good voxels of
    (counts - background); bad voxels (flagged, negative or non-finite counts) count as
    background. Centroids weight each good voxel by max(counts - background, 0) (unweighted
    when all of a peak is at or below background).

    Args:
        peak_labels: (F, H, W) int peak labels (0 = background), e.g. from :func:`link_peaks_3d`, or
            a :class:`dipid.results.FrameStack` of them (``Peaks3D.label_frames``).
        counts: detector counts of the same F frames (see :data:`CountsSource`), any real dtype.
        frame_numbers: (F,) frame number of each slice in its scan (default 0..F-1).
        axis_values: (n_scan,) scan-axis value of every frame of the scan; adds a column named
            ``axis_name`` holding the axis value at the fractional centroid frame (linear
            interpolation).
        axis_name: name of that column (e.g. "eta").
        scores: (F, H, W) float per-voxel instance score (or callable k -> (H, W)); ``score`` is
            the peak's highest.
        sources: (F, H, W) uint8 per-voxel model flags (:data:`dipid.results.SOURCE_FLAGS`) or a
            callable; ``models`` names the models that found any part of the peak.
        bad_pixels: (F, H, W) bool pixels to ignore (or callable), on top of negative counts.
        background_annulus: width of the background ring, pixels (>= 1).
    Returns:
        dict of equal-length columns (numpy arrays; ``models`` a list of str): id, first_frame,
        last_frame, n_frames (frames the peak spans), centroid_frame, centroid_row,
        centroid_col (pixels), ``<axis_name>`` (when axis_values are given), intensity (counts),
        background (mean subtracted level, counts per pixel), max_counts, voxels, bad_voxels,
        frame0, row0, col0, frame1, row1, col1 (bounding box; frame numbers, *1 exclusive),
        score, models.
    """
    # a FrameStack (e.g. Peaks3D.label_frames) gives one frame at a time and knows its largest id
    labels = peak_labels if isinstance(peak_labels, FrameStack) else np.asarray(peak_labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"peak_labels must be an (F, H, W) integer volume, got {labels.dtype} {labels.shape}")
    if background_annulus < 1:
        raise ValueError(f"background_annulus must be >= 1 pixel, got {background_annulus}")
    n_frames, height, width = labels.shape
    frames = np.arange(n_frames) if frame_numbers is None else np.asarray(frame_numbers, dtype=np.int64)
    if frames.shape != (n_frames,):
        raise ValueError(f"frame_numbers must have {n_frames} entries, got {frames.shape}")
    n = int(labels.max(initial=0))
    size = n + 1

    intensity = np.zeros(size)
    background_total = np.zeros(size)
    good_voxels = np.zeros(size, np.int64)
    voxels = np.zeros(size, np.int64)
    sum_w, sum_wk, sum_wr, sum_wc = (np.zeros(size) for _ in range(4))
    sum_k, sum_r, sum_c = (np.zeros(size) for _ in range(3))
    max_counts = np.full(size, -np.inf)
    best_score = np.full(size, np.nan if scores is None else -np.inf)
    flags = np.zeros(size, np.uint8)
    first = np.full(size, n_frames, np.int64)
    last = np.full(size, -1, np.int64)
    row0 = np.full(size, height, np.int64)
    col0 = np.full(size, width, np.int64)
    row1 = np.zeros(size, np.int64)
    col1 = np.zeros(size, np.int64)

    count_frames = _as_frame_iterator(counts, n_frames, "counts")
    score_frames = _frame_values(scores, n_frames, "scores", labels.shape)
    source_frames = _frame_values(sources, n_frames, "sources", labels.shape)
    bad_frames = _frame_values(bad_pixels, n_frames, "bad_pixels", labels.shape)
    sparse = isinstance(labels, SparseFrames)
    # sparse labels: the background rings look at a dense label frame, written and cleared again
    # at the peaks' pixels only (a new 4-megapixel frame per slice costs more than the rest)
    label_buffer = np.zeros((height, width), labels.dtype) if sparse else None
    for k in range(n_frames):
        frame_counts, frame_bad = next(count_frames)
        score_map, source_map, extra_bad = next(score_frames), next(source_frames), next(bad_frames)
        if sparse:
            # the peaks' pixels as flat indices, as kept
            footprint, peak_of = labels.pixels(k)
            label = label_buffer
            label.reshape(-1)[footprint] = peak_of
        else:
            label = labels[k]
            # The peaks' pixels as flat indices, found once: boolean indexing of a 4-megapixel frame
            # costs as much as this search, and every per-voxel sum below needs only these pixels.
            footprint = np.flatnonzero(label.ravel() > 0)
            peak_of = label.ravel()[footprint]
        try:
            area = np.bincount(peak_of, minlength=size)
            present = np.flatnonzero(area[1:]) + 1
            if present.size == 0:
                continue
            values = np.asarray(frame_counts)  # as read (float32 filled, or stored integers)
            if values.dtype.kind not in "iuf":
                values = values.astype(np.float64)
            # only the peaks' pixels and their background rings are taken, as float64, below
            if values.shape != (height, width):
                raise ScanShapeError(f"counts frame {k} has shape {values.shape}; the peak labels have {(height, width)}")
            good = _GoodPixels(values, (frame_bad, extra_bad))

            # Each present peak's box in this frame, from its pixels (find_objects would scan the
            # frame and list every peak of the scan, present or not, on every frame).
            rows_fp, cols_fp = np.divmod(footprint, width)
            order = np.argsort(peak_of, kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(peak_of[order]) != 0])  # one run per present peak
            top, bottom = np.minimum.reduceat(rows_fp[order], starts), np.maximum.reduceat(rows_fp[order], starts) + 1
            left, right = np.minimum.reduceat(cols_fp[order], starts), np.maximum.reduceat(cols_fp[order], starts) + 1

            background = np.zeros(size)
            frame_level: float | None = None
            for i, peak in enumerate(present.tolist()):
                box = (slice(int(top[i]), int(bottom[i])), slice(int(left[i]), int(right[i])))
                level = _ring_background(label, values, good, peak, box, background_annulus)
                if level is None:
                    if frame_level is None:
                        free = good.crop(slice(None), slice(None)) & (label == 0)
                        frame_level = float(np.median(values[free].astype(np.float64))) if free.any() else 0.0
                    level = frame_level
                background[peak] = level
            row0[present] = np.minimum(row0[present], top)
            row1[present] = np.maximum(row1[present], bottom)
            col0[present] = np.minimum(col0[present], left)
            col1[present] = np.maximum(col1[present], right)
            first[present] = np.minimum(first[present], k)
            last[present] = k

            voxels += area
            sum_k += area * k
            sum_r += np.bincount(peak_of, weights=rows_fp, minlength=size)
            sum_c += np.bincount(peak_of, weights=cols_fp, minlength=size)

            good_fp = good.at(footprint)
            peak_good = peak_of[good_fp]
            good_values = values.ravel()[footprint[good_fp]].astype(np.float64)
            net = good_values - background[peak_good]
            n_good = np.bincount(peak_good, minlength=size)
            good_voxels += n_good
            intensity += np.bincount(peak_good, weights=net, minlength=size)
            background_total += background * n_good
            weight = np.clip(net, 0.0, None)
            frame_w = np.bincount(peak_good, weights=weight, minlength=size)
            sum_w += frame_w
            sum_wk += frame_w * k
            sum_wr += np.bincount(peak_good, weights=weight * rows_fp[good_fp], minlength=size)
            sum_wc += np.bincount(peak_good, weights=weight * cols_fp[good_fp], minlength=size)
            if peak_good.size:
                frame_max = np.full(size, -np.inf)
                np.maximum.at(frame_max, peak_good, good_values)
                np.maximum(max_counts, frame_max, out=max_counts)
            if score_map is not None:
                frame_score = np.full(size, -np.inf)
                np.maximum.at(frame_score, peak_of, _values_at(score_map, footprint).astype(np.float64))
                np.maximum(best_score, frame_score, out=best_score)
            if source_map is not None:
                voxel_flags = _values_at(source_map, footprint).astype(np.uint8)
                for bit in SOURCE_FLAGS.values():
                    has = np.bincount(peak_of, weights=(voxel_flags & bit) > 0, minlength=size) > 0
                    flags[has] |= np.uint8(bit)
        finally:
            if sparse:  # the buffer is all zeros again
                label.reshape(-1)[footprint] = 0

    ids = np.flatnonzero(voxels[1:]) + 1
    weighted = sum_w[ids] > 0
    safe_w = np.where(weighted, sum_w[ids], 1.0)

    def centroid(weighted_sum: np.ndarray, plain_sum: np.ndarray) -> np.ndarray:
        return np.where(weighted, weighted_sum[ids] / safe_w, plain_sum[ids] / voxels[ids])

    centroid_index = centroid(sum_wk, sum_k)
    centroid_frame = np.interp(centroid_index, np.arange(n_frames), frames) if n_frames else centroid_index
    table: dict[str, Any] = {
        "id": ids.astype(np.int64),
        "first_frame": frames[first[ids]] if ids.size else np.zeros(0, np.int64),
        "last_frame": frames[last[ids]] if ids.size else np.zeros(0, np.int64),
    }
    table["n_frames"] = table["last_frame"] - table["first_frame"] + 1
    table["centroid_frame"] = centroid_frame
    table["centroid_row"] = centroid(sum_wr, sum_r)
    table["centroid_col"] = centroid(sum_wc, sum_c)
    if axis_values is not None:
        axis = np.asarray(axis_values, dtype=np.float64)
        column = axis_name if axis_name not in PEAK_COLUMNS else f"{axis_name}_axis"
        table[column] = np.interp(centroid_frame, np.arange(len(axis)), axis) if len(axis) else np.full(len(ids), np.nan)
    table["intensity"] = intensity[ids]
    table["background"] = np.where(good_voxels[ids] > 0, background_total[ids] / np.maximum(good_voxels[ids], 1), np.nan)
    table["max_counts"] = np.where(np.isfinite(max_counts[ids]), max_counts[ids], np.nan)
    table["voxels"] = voxels[ids]
    table["bad_voxels"] = voxels[ids] - good_voxels[ids]
    table["frame0"] = table["first_frame"].copy()
    table["row0"] = row0[ids]
    table["col0"] = col0[ids]
    table["frame1"] = table["last_frame"] + 1
    table["row1"] = row1[ids]
    table["col1"] = col1[ids]
    table["score"] = np.where(np.isfinite(best_score[ids]), best_score[ids], np.nan).astype(np.float64)
    table["models"] = [source_names(int(f)) for f in flags[ids]] if sources is not None else ["unknown"] * len(ids)
    return table


# ---------------------------------------------------------------------------------------------
# tables


def to_dataframe(columns: dict[str, Any]) -> Any:
    """The peak table as a pandas DataFrame when pandas is installed, else the dict unchanged."""
    try:
        import pandas as pd
    except ImportError:
        return columns
    return pd.DataFrame({name: list(values) if isinstance(values, list) else np.asarray(values)
                         for name, values in columns.items()})


def write_peaks_csv(columns: dict[str, Any], path: str | Path) -> Path:
    """Write the peak table as CSV (header row, one row per peak), atomically. Returns the path."""
    names = list(columns)
    lengths = {len(columns[name]) for name in names}
    if len(lengths) > 1:
        raise ValueError(f"peak table columns differ in length: {sorted(lengths)}")
    n_rows = lengths.pop() if lengths else 0
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for i in range(n_rows):
        writer.writerow([_csv_value(columns[name][i]) for name in names])
    path = Path(path)
    atomic_write_text(path, buffer.getvalue())
    return path


def _csv_value(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return repr(float(value))  # full precision, "nan" for missing
    if isinstance(value, np.integer):
        return int(value)
    return value


# ---------------------------------------------------------------------------------------------
# scans


@dataclass
class Peaks3D:
    """The 3D peaks of a scan.

    Attributes:
        table: the columns of :func:`peaks_table`, one row per peak.
        label_frames: the (F, H, W) int32 peak labels of the held frames (0 = none, table ``id`` =
            label) as a :class:`dipid.results.FrameStack`, each frame made when asked for (or an
            array); :attr:`labels` is the whole volume.
        frame_numbers: (F,) int64 frame number of each slice of the labels.
        axis_name: the scan axis, also the name of the table's axis-centroid column.
        model: the per-frame instance set the peaks were linked from ("joint", "tlm", ...).
        parameters: the linking and measuring settings used.
    """

    table: dict[str, Any]
    label_frames: FrameStack | np.ndarray
    frame_numbers: np.ndarray
    axis_name: str = "frame"
    model: str = "joint"
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        """(F, H, W) int32 peak labels, built whole (F x H x W x 4 bytes: for a long scan, read
        ``label_frames[k]`` a frame at a time instead)."""
        return np.asarray(self.label_frames, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.table["id"])

    def to_dataframe(self) -> Any:
        """pandas DataFrame of the table (the dict when pandas is missing)."""
        return to_dataframe(self.table)

    def to_csv(self, path: str | Path) -> Path:
        """Write the table as CSV, atomically."""
        return write_peaks_csv(self.table, path)

    def __repr__(self) -> str:
        return f"Peaks3D(n={len(self)}, frames={len(self.frame_numbers)}, model={self.model!r})"


def _consecutive_runs(numbers: np.ndarray) -> list[tuple[int, int]]:
    """Ascending ints -> [(start, stop)] half-open runs of consecutive values."""
    if numbers.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(numbers) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(numbers, breaks)]


def _scan_frames(scan: "Scan", frame_numbers: np.ndarray, batch_size: int, *, raw: bool = False
                 ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield (filled counts (H, W) float32, bad (H, W) bool) of ``frame_numbers`` from an open scan;
    ``raw``: (counts as stored, None), for a caller that has the bad pixels already and never
    looks at them (filling them is a third of the cost of reading an Eiger frame)."""
    for start, stop in _consecutive_runs(frame_numbers):
        if raw:
            for first in range(start, stop, batch_size):
                yield from ((frame, None) for frame in scan.read_raw(first, min(first + batch_size, stop)))
            continue
        for batch in scan.iter_frames(start, stop, batch_size):
            for b in range(len(batch.frames)):
                yield batch.frames[b], batch.bad_pixels[b]


def _open_source_scan(result: ScanResult, what: str) -> "Scan":
    """The scan ``result`` was predicted from, opened (the caller closes it)."""
    # h5py is heavy and only needed when a scan is re-read
    from dipid.io import open_scan

    if not result.scan_path:
        raise ScanError(
            f"this scan result has no scan file (scan_path is None) to re-read counts from; "
            f"pass counts=(F, H, W) array of the predicted frames to {what}"
        )
    return open_scan(result.scan_path)


def read_counts(result: ScanResult, scan: "Scan | None" = None) -> np.ndarray:
    """(F, H, W) float32 filled counts of ``result``'s held frames (``ScanResult.read_counts``).

    Args:
        result: the predictions.
        scan: an open :class:`dipid.io.Scan` to read from (left open); None opens
            ``result.scan_path`` and closes it again.
    Raises:
        ScanError: ``scan`` is None and the result has no scan file.
    """
    if scan is not None:
        return scan.read_frames(result.frame_numbers)[0]
    with _open_source_scan(result, "ScanResult.read_counts") as opened:
        return opened.read_frames(result.frame_numbers)[0]


def scan_peaks(
    result: ScanResult,
    counts: np.ndarray | None = None,
    *,
    scan: "Scan | None" = None,
    model: str = "joint",
    max_gap: int = 1,
    connectivity: int = 1,
    min_overlap: float = 0.5,
    min_frames: int = 1,
    background_annulus: int = 3,
    batch_size: int = 16,
) -> Peaks3D:
    """Link a scan result's per-frame instances into 3D peaks and measure them.

    Memory: the instances are linked a frame at a time (:func:`link_instances`) and the counts are
    read a batch at a time, so a long scan needs no (F, H, W) array; the peak labels come back as a
    :class:`dipid.results.FrameStack` made from the instances (``Peaks3D.label_frames``).

    Args:
        result: the predictions (frames need not be consecutive).
        counts: (F, H, W) counts of the held frames in ``result.frame_numbers`` order, or of the
            whole scan (n_scan, H, W); None re-reads them from ``scan`` or else
            ``result.scan_path``, a batch at a time. Negative counts and each frame's
            ``bad_pixels`` are ignored.
        scan: an open :class:`dipid.io.Scan` (the one predicted) to re-read counts from; left open.
        model: which instance set to link: "joint", "tlm", "ssl" or "classical".
        max_gap, connectivity, min_overlap, min_frames: see :func:`link_peaks_3d`.
        background_annulus: see :func:`peaks_table`.
        batch_size: frames read per batch when re-reading the scan.
    Returns:
        :class:`Peaks3D` with the table and the peak labels.
    Raises:
        ScanError: counts and scan are None and the result has no scan file; ScanShapeError:
            counts do not match the result's frames.
    """
    frame_numbers = result.frame_numbers
    per_frame = result.instances(model)
    labels = link_instances(per_frame, frame_numbers, result.frame_shape, max_gap=max_gap, connectivity=connectivity,
                            min_overlap=min_overlap, min_frames=min_frames)
    if counts is not None:
        array = np.asarray(counts)
        if array.ndim == 3:
            array = result.held(array)
        if array.shape != labels.shape:
            raise ScanShapeError(
                f"counts have shape {array.shape}; expected {labels.shape} (the {len(frame_numbers)} predicted "
                f"frames) or the whole scan ({len(result.axis_values)}, {result.frame_shape[0]}, {result.frame_shape[1]})",
                file=result.scan_path,
            )

    held = [result.frames[int(f)] for f in frame_numbers]
    has_bad = any(frame.bad_pixels is not None for frame in held)

    def bad_frame(k: int) -> np.ndarray:
        mask = held[k].bad_pixels
        return np.zeros(result.frame_shape, bool) if mask is None else mask

    with contextlib.ExitStack() as opened:
        source: CountsSource
        if counts is not None:
            source = array
        else:  # re-read a batch at a time; a scan opened here is closed when the table is done
            if scan is None:
                scan = opened.enter_context(_open_source_scan(result, "scan_peaks / ScanResult.peaks"))
            # every frame's bad pixels known (as predict_scan keeps them): the table ignores
            # them, so the stored counts serve as well as the filled ones
            source = _scan_frames(scan, frame_numbers, batch_size,
                                  raw=all(frame.bad_pixels is not None for frame in held))
        table = peaks_table(
            labels, source,
            frame_numbers=frame_numbers, axis_values=result.axis_values if len(result.axis_values) else None,
            axis_name=result.axis_name,
            scores=SparseFrames(lambda k: _score_pixels(per_frame[k]), len(per_frame), result.frame_shape, np.float32),
            sources=SparseFrames(lambda k: _source_pixels(per_frame[k]), len(per_frame), result.frame_shape, np.uint8),
            bad_pixels=bad_frame if has_bad else None, background_annulus=background_annulus,
        )
    logger.info("linked %d frames of %s instances into %d 3D peaks", len(frame_numbers), model, len(table["id"]))
    return Peaks3D(
        table=table, label_frames=labels, frame_numbers=frame_numbers, axis_name=result.axis_name, model=model,
        parameters={"max_gap": max_gap, "connectivity": connectivity, "min_overlap": min_overlap,
                    "min_frames": min_frames, "background_annulus": background_annulus},
    )


# ---------------------------------------------------------------------------------------------
# validation


def match_peaks_3d(pred_labels: np.ndarray, truth_labels: np.ndarray, *, iou_threshold: float = 0.5) -> dict[str, Any]:
    """Match predicted to true 3D peaks by voxel IoU, greedily (highest IoU first, one-to-one).

    Args:
        pred_labels: (F, H, W) int predicted peak labels (0 = none).
        truth_labels: (F, H, W) int true peak labels (0 = none), e.g. reflection id + 1.
        iou_threshold: smallest IoU that counts as a match.
    Returns:
        dict with tp, fp, fn (int), precision, recall (float; 1.0 when there is nothing to get
        wrong), mean_iou (over matches; nan when none) and matches ((M, 2) int64 pred, truth ids).
    """
    pred = np.asarray(pred_labels)
    truth = np.asarray(truth_labels)
    if pred.shape != truth.shape:
        raise ValueError(f"pred_labels {pred.shape} and truth_labels {truth.shape} differ in shape")
    pred_ids = np.unique(pred[pred > 0])
    truth_ids = np.unique(truth[truth > 0])
    pred_sizes = np.bincount(pred.ravel().astype(np.int64), minlength=1)
    truth_sizes = np.bincount(truth.ravel().astype(np.int64), minlength=1)
    both = (pred > 0) & (truth > 0)
    pairs, overlap = np.unique(np.stack([pred[both], truth[both]]).astype(np.int64), axis=1, return_counts=True)
    union = pred_sizes[pairs[0]] + truth_sizes[pairs[1]] - overlap
    iou = overlap / np.maximum(union, 1)
    order = np.argsort(-iou, kind="stable")
    used_pred: set[int] = set()
    used_truth: set[int] = set()
    matches, matched_iou = [], []
    for i in order:  # one pass over overlapping pairs only
        if iou[i] < iou_threshold:
            break
        p, t = int(pairs[0, i]), int(pairs[1, i])
        if p in used_pred or t in used_truth:
            continue
        used_pred.add(p)
        used_truth.add(t)
        matches.append((p, t))
        matched_iou.append(float(iou[i]))
    tp = len(matches)
    fp = len(pred_ids) - tp
    fn = len(truth_ids) - tp
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "mean_iou": float(np.mean(matched_iou)) if matched_iou else float("nan"),
        "matches": np.asarray(matches, dtype=np.int64).reshape(-1, 2),
    }

