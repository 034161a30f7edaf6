"""Typed result objects: what the predictors return, and the small rules every user of them shares.

Every array here is numpy on the CPU. Per-frame instance masks are stored cropped to their boxes
(peaks are small next to the frame), so a long scan's results stay small; ``Instances.masks``
pastes them back into full frames on demand.

This module is the bottom of dipid's dependency graph: it imports nothing of dipid but
:mod:`dipid.errors`. The code that works on results (postprocess, volume, viz, the NeXus writer,
tiling) imports the rules from here: the source flags (:data:`SOURCE_FLAGS`, :func:`source_names`,
:func:`source_flags`), the model names (:data:`MODEL_KINDS`, :func:`check_model`), which models a
result holds (:meth:`ImageResult.has`, :meth:`ScanResult.models_present`) and how a per-frame
array of the whole scan relates to the held frames (:meth:`ScanResult.held`,
:meth:`ScanResult.held_axis_values`). :class:`FrameStack` is an (F, H, W) stack made a frame at
a time (e.g. :meth:`ScanResult.label_frames`), what long scans use instead of whole volumes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dipid.errors import ScanShapeError, UnknownNameError

if TYPE_CHECKING:  # for annotations only: these modules import this one
    from dipid.io.scan import Scan
    from dipid.volume import Peaks3D

__all__ = [
    "SOURCE_FLAGS",
    "MODEL_KINDS",
    "source_names",
    "source_flags",
    "check_model",
    "FrameStack",
    "Instances",
    "SSLOutput",
    "ImageResult",
    "ScanResult",
]

#: Bit flags recording which model(s) found an instance (``Instances.sources``, the joint output's
#: sources, the ``models`` column of the 3D-peak table). The one definition of these numbers.
SOURCE_FLAGS: dict[str, int] = {"tlm": 1, "ssl": 2, "classical": 4}
#: The per-frame instance sets a result can hold.
MODEL_KINDS = ("tlm", "ssl", "joint", "classical")


def source_names(flags: int) -> str:
    """Source bit flags -> model names joined by "+" (3 -> "tlm+ssl"); "none" for 0."""
    names = [name for name, bit in SOURCE_FLAGS.items() if int(flags) & bit]
    return "+".join(names) if names else "none"


def source_flags(names: str) -> int:
    """The inverse of :func:`source_names`: "tlm+ssl" -> 3, "none" or "" -> 0.

    Raises:
        UnknownNameError: for a name outside :data:`SOURCE_FLAGS`.
    """
    flags = 0
    for name in str(names).split("+"):
        if name in ("", "none"):
            continue
        if name not in SOURCE_FLAGS:
            raise UnknownNameError("source", name, tuple(SOURCE_FLAGS))
        flags |= SOURCE_FLAGS[name]
    return flags


def check_model(model: str, kind: str = "model") -> None:
    """Raise :class:`UnknownNameError` (naming ``kind``) unless ``model`` is one of :data:`MODEL_KINDS`."""
    if model not in MODEL_KINDS:
        raise UnknownNameError(kind, model, MODEL_KINDS)


class FrameStack:
    """A read-only (F, H, W) stack whose frames are made on demand, one at a time.

    A long scan's per-frame images (instance label images, 3D peak labels) are computed from its
    compact per-frame results when a frame is asked for, instead of being held as one array of
    F x H x W (gigabytes for a long Eiger 4M scan). ``stack[k]`` is frame k (H, W); ``len``,
    ``shape``, ``dtype``, ``ndim`` and iteration work as on an array; ``np.asarray(stack)`` builds
    the whole array.

    Args:
        frame: slice index k (0..n_frames-1) -> (H, W) array of ``dtype``.
        n_frames, frame_shape, dtype: the stack's shape and dtype.
        max_value: the largest value of the stack, when known without building it (e.g. the
            number of 3D peaks); None computes it on :meth:`max` by visiting every frame.
    """

    def __init__(self, frame: Callable[[int], np.ndarray], n_frames: int, frame_shape: tuple[int, int],
                 dtype: Any, *, max_value: int | float | None = None):
        self._frame = frame
        self.shape = (int(n_frames), int(frame_shape[0]), int(frame_shape[1]))
        self.dtype = np.dtype(dtype)
        self.max_value = max_value

    ndim = 3

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """``stack[k]`` -> (H, W); a slice or index list -> (k, H, W) (built, so keep it short)."""
        if isinstance(index, (int, np.integer)):
            k = int(index)
            if not -len(self) <= k < len(self):
                raise IndexError(f"frame {k} is outside the stack of {len(self)} frames")
            out = np.asarray(self._frame(k + len(self) if k < 0 else k), dtype=self.dtype)
            if out.shape != self.shape[1:]:
                raise ScanShapeError(f"frame {k} of the stack has shape {out.shape}; expected {self.shape[1:]}")
            return out
        picks = np.arange(len(self))[index]
        return np.stack([self[int(k)] for k in np.atleast_1d(picks)]) if np.size(picks) else \
            np.zeros((0, *self.shape[1:]), self.dtype)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[k] for k in range(len(self)))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.zeros(self.shape, self.dtype)
        for k in range(len(self)):
            out[k] = self[k]
        return out if dtype is None else out.astype(dtype, copy=False)

    def max(self, initial: int | float | None = None) -> Any:
        """The largest value (``max_value`` when known, else a pass over the frames)."""
        if self.max_value is None:
            tops = [frame.max(initial=initial) if initial is not None else frame.max() for frame in self]
            self.max_value = max(tops) if tops else initial
        if initial is not None and self.max_value is not None:
            return max(self.max_value, initial)
        return self.max_value

    def __repr__(self) -> str:
        return f"FrameStack(shape={self.shape}, dtype={self.dtype})"


@dataclass
class Instances:
    """Peak instances in one frame of shape ``(height, width)``.

    Attributes:
        boxes: (N, 4) int32 pixel boxes (x0, y0, x1, y1), x1/y1 exclusive.
        crops: N bool arrays, crop i of shape (y1 - y0, x1 - x0): the mask inside box i.
        scores: (N,) float32 confidences in [0, 1].
        sources: (N,) uint8 bit flags of the models that found each instance (see SOURCE_FLAGS).
        shape: (height, width) of the frame.
    """

    boxes: np.ndarray
    crops: list[np.ndarray]
    scores: np.ndarray
    sources: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.int32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.sources = np.asarray(self.sources, dtype=np.uint8).reshape(-1)
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        if not (len(self.boxes) == len(self.crops) == len(self.scores) == len(self.sources)):
            raise ValueError("boxes, crops, scores and sources differ in length")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, shape: tuple[int, int]) -> "Instances":
        return cls(np.zeros((0, 4), np.int32), [], np.zeros(0, np.float32), np.zeros(0, np.uint8), shape)

    @classmethod
    def from_masks(cls, masks: np.ndarray, scores: np.ndarray, sources: np.ndarray | int) -> "Instances":
        """From (N, H, W) bool masks; empty masks are dropped."""
        masks = np.asarray(masks, dtype=bool)
        n, h, w = masks.shape
        scores = np.asarray(scores, np.float32).reshape(-1)
        sources = np.broadcast_to(np.asarray(sources, np.uint8), (n,))
        return cls.from_windows(((masks[i], 0, 0) for i in range(n)), scores, sources, (h, w))

    @classmethod
    def from_labels(cls, labels: np.ndarray, scores: np.ndarray, sources: np.ndarray | int, *,
                    boxes: np.ndarray | None = None) -> "Instances":
        """From an (H, W) integer label image: instance i is the pixels labelled i + 1 (i < len(scores));
        empty ones are dropped. ``boxes`` (N, 4) x0, y0, x1, y1 (exclusive; rounded down), when
        known, bound where each is looked for, so no full-frame mask is made per instance (an
        Eiger 4M frame with hundreds of peaks would take gigabytes as (N, H, W) masks)."""
        labels = np.asarray(labels)
        h, w = labels.shape
        scores = np.asarray(scores, np.float32).reshape(-1)
        n = scores.size
        sources = np.broadcast_to(np.asarray(sources, np.uint8), (n,))
        if boxes is None:
            windows = ((labels == i + 1, 0, 0) for i in range(n))
        else:
            corners = np.asarray(boxes).astype(np.intp).reshape(-1, 4)
            windows = ((labels[y0:y1, x0:x1] == i + 1, y0, x0) for i, (x0, y0, x1, y1) in enumerate(corners))
        return cls.from_windows(windows, scores, sources, (h, w))

    @classmethod
    def from_windows(cls, windows: Iterable[tuple[np.ndarray, int, int]], scores: np.ndarray, sources: np.ndarray,
                     shape: tuple[int, int]) -> "Instances":
        """From one (mask window, row0, col0) per instance, a bool window placed with its top-left
        pixel at (row0, col0) of a frame of ``shape``: each cropped to its pixels' box; instances
        whose window holds no pixel are dropped. ``scores`` (N,) float, ``sources`` (N,) uint8."""
        boxes, crops, keep = [], [], []
        for i, (window, top, left) in enumerate(windows):
            rows = np.flatnonzero(window.any(axis=1))
            if rows.size == 0:
                continue
            cols = np.flatnonzero(window[rows[0]:rows[-1] + 1].any(axis=0))
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            boxes.append((c0 + left, r0 + top, c1 + left, r1 + top))
            crops.append(window[r0:r1, c0:c1].copy())
            keep.append(i)
        keep_idx = np.asarray(keep, dtype=np.int64)
        return cls(np.asarray(boxes, np.int32).reshape(-1, 4), crops, scores[keep_idx], sources[keep_idx], shape)

    # -- container protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> "Instances":
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        return Instances(self.boxes[idx], [self.crops[i] for i in idx], self.scores[idx], self.sources[idx], self.shape)

    def __iter__(self) -> Iterator["Instances"]:
        return (self[i] for i in range(len(self)))

    # -- derived views ------------------------------------------------------------------------
    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool full-frame masks."""
        out = np.zeros((len(self), *self.shape), dtype=bool)
        for i, ((x0, y0, x1, y1), crop) in enumerate(zip(self.boxes, self.crops)):
            out[i, y0:y1, x0:x1] = crop
        return out

    @property
    def areas(self) -> np.ndarray:
        """(N,) int64 pixel counts."""
        return np.asarray([int(c.sum()) for c in self.crops], dtype=np.int64)

    def union_mask(self) -> np.ndarray:
        """(H, W) bool: pixels covered by any instance."""
        out = np.zeros(self.shape, dtype=bool)
        for (x0, y0, x1, y1), crop in zip(self.boxes, self.crops):
            out[y0:y1, x0:x1] |= crop
        return out

    def label_image(self) -> np.ndarray:
        """(H, W) int32: 0 = background, i + 1 = instance i (earlier, higher-scored instances win overlaps)."""
        out = np.zeros(self.shape, dtype=np.int32)
        for i in range(len(self) - 1, -1, -1):
            x0, y0, x1, y1 = self.boxes[i]
            region = out[y0:y1, x0:x1]
            region[self.crops[i]] = i + 1
        return out

    def centroids(self) -> np.ndarray:
        """(N, 2) float64 (row, col) mask centroids in pixels."""
        out = np.zeros((len(self), 2))
        for i, ((x0, y0, _, _), crop) in enumerate(zip(self.boxes, self.crops)):
            rr, cc = np.nonzero(crop)
            out[i] = (rr.mean() + y0, cc.mean() + x0) if rr.size else (np.nan, np.nan)
        return out

    def filter(self, *, score_threshold: float = 0.0, min_area: int = 0) -> "Instances":
        """Instances with score >= score_threshold and area >= min_area."""
        keep = (self.scores >= score_threshold) & (self.areas >= min_area)
        return self[np.flatnonzero(keep)]

    def to_dict(self) -> dict[str, list]:
        """Columns ready for pandas: id, score, area, x0, y0, x1, y1, row, col, source."""
        cents = self.centroids()
        return {
            "id": list(range(len(self))),
            "score": self.scores.tolist(),
            "area": self.areas.tolist(),
            "x0": self.boxes[:, 0].tolist(),
            "y0": self.boxes[:, 1].tolist(),
            "x1": self.boxes[:, 2].tolist(),
            "y1": self.boxes[:, 3].tolist(),
            "row": cents[:, 0].tolist(),
            "col": cents[:, 1].tolist(),
            "source": [source_names(int(s)) for s in self.sources],
        }

    def __repr__(self) -> str:
        return f"Instances(n={len(self)}, shape={self.shape}, scores={np.round(self.scores, 3).tolist()})"


@dataclass
class SSLOutput:
    """The SSLM's answer for one frame.

    Attributes:
        probability: (H, W) float32 per-pixel peak probability in [0, 1] (None when not kept).
        mask: (H, W) bool peak/background segmentation (probability >= threshold).
        instances: connected components of ``mask`` of at least ``min_area`` pixels.
    """

    probability: np.ndarray | None
    mask: np.ndarray
    instances: Instances


@dataclass
class ImageResult:
    """Predictions for one frame.

    Attributes:
        frame: frame number in its scan (None for a bare array).
        shape: (height, width).
        tlm: Mask R-CNN instances after thresholds (None when the TLM was not run).
        ssl: SSLM output (None when not run).
        classical: classical-baseline instances (None when not run).
        joint: the fused instance set (see :func:`dipid.postprocess.fuse_instances`).
        bad_pixels: (H, W) bool mask of pixels no metric should count, when known.
        timings: seconds spent per stage, for this frame (batched stages divided evenly).
    """

    frame: int | None
    shape: tuple[int, int]
    joint: Instances
    tlm: Instances | None = None
    ssl: SSLOutput | None = None
    classical: Instances | None = None
    bad_pixels: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def has(self, model: str) -> bool:
        """Whether ``model``'s output is present (the model ran on this frame; "joint" always is)."""
        check_model(model)
        return getattr(self, model) is not None

    def instances(self, model: str = "joint") -> Instances:
        """The instance set of one model: "tlm", "ssl", "joint" or "classical" (empty when it did not run)."""
        check_model(model)
        if model == "ssl":
            return self.ssl.instances if self.ssl is not None else Instances.empty(self.shape)
        found = getattr(self, model)
        return found if found is not None else Instances.empty(self.shape)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"frame": self.frame, "shape": list(self.shape), "timings": dict(self.timings)}
        for kind in MODEL_KINDS:
            if self.has(kind):
                out[kind] = self.instances(kind).to_dict()
        return out


@dataclass
class ScanResult:
    """Predictions for a range of frames of one scan.

    Attributes:
        frames: per-frame results keyed by frame number (ascending).
        axis_name: the scanned motor (e.g. "eta", "hkl_l"), or "frame".
        axis_values: (n_scan_frames,) float64 motor value of every frame of the scan.
        frame_shape: (height, width).
        scan_path: the scan file, when predicted from one.
        metadata: scan metadata (dict) and the predictor's parameters under "parameters".
    """

    frames: dict[int, ImageResult]
    axis_name: str
    axis_values: np.ndarray
    frame_shape: tuple[int, int]
    scan_path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)

    def __repr__(self) -> str:
        # A summary, not every frame: the dataclass default prints each instance of a long scan.
        numbers = self.frame_numbers
        held = f"frames {numbers[0]}-{numbers[-1]}" if len(numbers) else "no frames"
        counts = {model: sum(len(inst) for inst in self.instances(model)) for model in self.models_present()}
        found = ", ".join(f"{model}: {n}" for model, n in counts.items()) or "none"
        scan = Path(self.scan_path).name if self.scan_path else "array"
        return (f"ScanResult({scan}, {len(self)} {held}, axis {self.axis_name!r}, "
                f"{self.frame_shape[0]}x{self.frame_shape[1]} px, instances {found})")

    def __getitem__(self, frame: int) -> ImageResult:
        return self.frames[frame]

    def __iter__(self) -> Iterator[ImageResult]:
        return iter(self.frames.values())

    @property
    def frame_numbers(self) -> np.ndarray:
        """(F,) int64 frame numbers held, ascending."""
        return np.asarray(sorted(self.frames), dtype=np.int64)

    # -- the rules shared by every user of a scan result -------------------------------------
    def models_present(self) -> list[str]:
        """The models whose output any held frame has, in :data:`MODEL_KINDS` order ([] for no frames)."""
        return [m for m in MODEL_KINDS if any(frame.has(m) for frame in self.frames.values())]

    def instances(self, model: str = "joint") -> list[Instances]:
        """``model``'s instances of each held frame, in ``frame_numbers`` order."""
        return [self.frames[int(f)].instances(model) for f in self.frame_numbers]

    def held_axis_values(self) -> np.ndarray | None:
        """(F,) float64 scan-axis value of each held frame; None when ``axis_values`` (the whole
        scan's) does not reach the last held frame."""
        frames = self.frame_numbers
        values = np.asarray(self.axis_values, dtype=np.float64).reshape(-1)
        if frames.size and values.size <= frames.max():
            return None
        return values[frames]

    def held(self, stack: np.ndarray, *, what: str = "counts") -> np.ndarray:
        """The held frames of a per-frame stack (counts, masks, ...).

        ``stack`` is either (F, ...) of the held frames in ``frame_numbers`` order, returned as
        is, or the whole scan's (n_scan, ...) indexed by frame number, from which the held
        frames are taken.

        Raises:
            ScanShapeError: ``stack`` is neither (its message says ``what`` was expected).
        """
        array = np.asarray(stack)
        frames = self.frame_numbers
        n = len(array) if array.ndim else 0
        if array.ndim and n == frames.size:
            return array
        if array.ndim and frames.size and n > frames.max():
            return array[frames]
        last = f"; frame {int(frames.max())} is held" if frames.size else ""
        raise ScanShapeError(f"{what} hold {n} frames; expected the {frames.size} frames of the result "
                             f"(in frame_numbers order) or the whole scan's{last}", file=self.scan_path)

    # -- conveniences: each is a one-line delegation to the module that does the work. That
    # module imports this one (results is the bottom of the graph), so it is imported when called.
    @classmethod
    def from_nexus(cls, path: str | Path) -> "ScanResult":
        """Read a results NeXus file back into a ScanResult (the inverse of :meth:`to_nexus`);
        see :func:`dipid.io.results_nexus.read_scan_result`."""
        # Delegation: results is the leaf; the implementation sits above it and imports it
        from dipid.io.results_nexus import read_scan_result

        return read_scan_result(path)

    def volume(self, model: str = "joint") -> np.ndarray:
        """(F, H, W) bool stack of each held frame's union mask, in ``frame_numbers`` order
        (:func:`dipid.volume.stack_masks`)."""
        # Delegation: results is the leaf; the implementation sits above it and imports it
        from dipid.volume import stack_masks

        return stack_masks(self.instances(model), self.frame_shape)

    def label_frames(self, model: str = "joint") -> FrameStack:
        """:meth:`label_volume` one frame at a time: a :class:`FrameStack` whose frame k is the label
        image of held frame k, made when asked for (what long scans use instead of the volume)."""
        per_frame = self.instances(model)
        return FrameStack(lambda k: per_frame[k].label_image(), len(per_frame), self.frame_shape, np.int32)

    def label_volume(self, model: str = "joint") -> np.ndarray:
        """(F, H, W) int32 stack of per-frame instance label images (ids restart in each frame;
        :func:`dipid.volume.stack_labels`)."""
        # Delegation: results is the leaf; the implementation sits above it and imports it
        from dipid.volume import stack_labels

        return stack_labels(self.instances(model), self.frame_shape)

    def peaks(self, counts: np.ndarray | None = None, *, model: str = "joint", **kwargs: Any) -> "Peaks3D":
        """Link per-frame instances into 3D peaks -> :class:`dipid.volume.Peaks3D` (``.table``,
        ``.labels``, ``.to_dataframe()``, ``.to_csv(path)``). ``counts`` (F, H, W) of the held
        frames; re-read from ``scan_path`` when None. See :func:`dipid.volume.scan_peaks`."""
        # Delegation: results is the leaf; the implementation sits above it and imports it
        from dipid.volume import scan_peaks

        return scan_peaks(self, counts, model=model, **kwargs)

    def to_nexus(self, path: str | Path, *, peaks: "Peaks3D | None" = None, model: str = "joint") -> Path:
        """Write the results NeXus file (atomically; :func:`dipid.io.results_nexus.write_results_nexus`);
        computes the 3D peaks of ``model`` when not given. :meth:`from_nexus` reads it back."""
        # Delegation: results is the leaf; the implementation sits above it and imports it
        from dipid.io.results_nexus import write_results_nexus

        peaks = peaks if peaks is not None else self.peaks(model=model)
        return write_results_nexus(path, self, peaks=peaks)

    def read_counts(self, scan: "Scan | None" = None) -> np.ndarray:
        """(F, H, W) float32 filled counts of the held frames, from ``scan`` (an open
        :class:`dipid.io.Scan`) or re-read from ``scan_path`` (:func:`dipid.volume.read_counts`)."""
        # Delegation: results is the leaf; the implementation sits above it and imports it
        from dipid.volume import read_counts

        return read_counts(self, scan)

    def view(self, path: str | Path, *, counts: np.ndarray | None = None, model: str = "joint") -> Path:
        """Write the standalone HTML viewer (3D peaks of ``model`` and a frame slider); returns its
        path (:func:`dipid.viz.view_scan_result`). Counts are re-read from ``scan_path`` when not given."""
        # Delegation: results is the leaf; the implementation sits above it and imports it
        from dipid.viz import view_scan_result

        peaks = self.peaks(counts, model=model)
        if counts is None and self.scan_path is not None:  # the shown frames only, read as they are drawn
            from dipid.io import open_scan  # delegation, as above

            with open_scan(self.scan_path) as scan:
                return view_scan_result(self, scan, path, peak_table=peaks)
        return view_scan_result(self, counts, path, peak_table=peaks)

    def counts(self, model: str = "joint") -> dict[str, list]:
        """Columns: frame, axis value (None when the axis does not cover the frames), number of
        instances, covered pixels."""
        fns = self.frame_numbers
        inst = self.instances(model)
        axis = self.held_axis_values()
        return {
            "frame": fns.tolist(),
            self.axis_name: axis.tolist() if axis is not None else [None] * len(fns),
            "n_instances": [len(i) for i in inst],
            "area": [int(i.areas.sum()) for i in inst],
        }
