"""Typed result objects: what the predictors return.

Every array here is numpy on the CPU. Per-frame instance masks are stored cropped to their boxes
(peaks are small next to the frame), so a long scan's results stay small; ``Instances.masks``
pastes them back into full frames on demand.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SOURCE_FLAGS", "Instances", "SSLOutput", "ImageResult", "ScanResult", "MODEL_KINDS"]

#: Bit flags recording which model(s) found an instance.
SOURCE_FLAGS = {"tlm": 1, "ssl": 2, "classical": 4}
#: The per-frame instance sets a result can hold.
MODEL_KINDS = ("tlm", "ssl", "joint", "classical")


def _sources_to_names(flags: int) -> str:
    names = [name for name, bit in SOURCE_FLAGS.items() if flags & bit]
    return "+".join(names) if names else "none"


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
        boxes, crops, keep = [], [], []
        for i in range(n):
            rows = np.flatnonzero(masks[i].any(axis=1))
            if rows.size == 0:
                continue
            cols = np.flatnonzero(masks[i, rows[0]:rows[-1] + 1].any(axis=0))
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            boxes.append((x0, y0, x1, y1))
            crops.append(masks[i, y0:y1, x0:x1].copy())
            keep.append(i)
        keep_idx = np.asarray(keep, dtype=np.int64)
        return cls(np.asarray(boxes, np.int32).reshape(-1, 4), crops, scores[keep_idx], sources[keep_idx], (h, w))

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
            "source": [_sources_to_names(int(s)) for s in self.sources],
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
        """Whether ``model``'s output is present (the model ran on this frame)."""
        return (self.ssl if model == "ssl" else getattr(self, model)) is not None

    def instances(self, model: str = "joint") -> Instances:
        """The instance set of one model: "tlm", "ssl", "joint" or "classical"."""
        from dipid.errors import UnknownNameError

        if model not in MODEL_KINDS:
            raise UnknownNameError("model", model, MODEL_KINDS)
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

    def __getitem__(self, frame: int) -> ImageResult:
        return self.frames[frame]

    def __iter__(self) -> Iterator[ImageResult]:
        return iter(self.frames.values())

    @property
    def frame_numbers(self) -> np.ndarray:
        """(F,) int64 frame numbers held, ascending."""
        return np.asarray(sorted(self.frames), dtype=np.int64)

    def volume(self, model: str = "joint") -> np.ndarray:
        """(F, H, W) bool stack of each held frame's union mask, in ``frame_numbers`` order."""
        from dipid.volume import stack_masks

        return stack_masks([self.frames[f].instances(model) for f in self.frame_numbers], self.frame_shape)

    def label_volume(self, model: str = "joint") -> np.ndarray:
        """(F, H, W) int32 stack of per-frame instance label images (ids restart in each frame)."""
        from dipid.volume import stack_labels

        return stack_labels([self.frames[f].instances(model) for f in self.frame_numbers], self.frame_shape)

    def peaks(self, counts: np.ndarray | None = None, *, model: str = "joint", **kwargs: Any):
        """Link per-frame instances into 3D peaks -> :class:`dipid.volume.Peaks3D` (``.table``,
        ``.labels``, ``.to_dataframe()``, ``.to_csv(path)``). ``counts`` (F, H, W) of the held
        frames; re-read from ``scan_path`` when None. See :func:`dipid.volume.scan_peaks`."""
        from dipid.volume import scan_peaks

        return scan_peaks(self, counts, model=model, **kwargs)

    def to_nexus(self, path: str | Path, *, peaks: Any | None = None, model: str = "joint") -> Path:
        """Write the results NeXus file (atomically); computes the 3D peaks when not given."""
        from dipid.io.results_nexus import write_results_nexus

        peaks = peaks if peaks is not None else self.peaks(model=model)
        return write_results_nexus(path, self, peaks=peaks, peak_labels=peaks.labels)

    def read_counts(self, scan: Any | None = None) -> np.ndarray:
        """(F, H, W) float32 filled counts of the held frames, from ``scan`` (an open
        :class:`dipid.io.Scan`) or re-read from ``scan_path``."""
        from dipid.errors import DipidError
        from dipid.io import open_scan

        if scan is not None:
            return scan.read_frames(self.frame_numbers)[0]
        if self.scan_path is None:
            raise DipidError("this result was not predicted from a scan file; pass the frames' counts")
        with open_scan(self.scan_path) as opened:
            return opened.read_frames(self.frame_numbers)[0]

    def view(self, path: str | Path, *, counts: np.ndarray | None = None, model: str = "joint") -> Path:
        """Write the standalone HTML viewer (3D peaks of ``model`` and a frame slider); returns its path."""
        from dipid.viz import view_scan_result

        counts = self.read_counts() if counts is None and self.scan_path is not None else counts
        return view_scan_result(self, counts, path, peak_table=self.peaks(counts, model=model))

    def counts(self, model: str = "joint") -> dict[str, list]:
        """Columns: frame, axis value, number of instances, covered pixels."""
        fns = self.frame_numbers
        inst = [self.frames[f].instances(model) for f in fns]
        return {
            "frame": fns.tolist(),
            self.axis_name: self.axis_values[fns].tolist() if len(self.axis_values) > (fns.max(initial=-1)) else [None] * len(fns),
            "n_instances": [len(i) for i in inst],
            "area": [int(i.areas.sum()) for i in inst],
        }
