"""Lazy reading of detector scans: :func:`open_scan` and :class:`Scan`.

A scan is never read whole: frames come from one HDF5 slice per batch (or one TIFF per frame),
and the files stay open between reads. See :mod:`dipid.io.nexus` for the layouts understood.

Bad pixels (``bad_pixels`` masks) are the static mask (negative in the first frame, or in a user
mask), negative or non-finite counts, and counts at or above the saturation value. The frames
returned as float32 have every *unmeasured* pixel (static mask, negative, non-finite) replaced by
its nearest good neighbour, and so, by default, is every saturated pixel (its clipped value is
not a measurement; the nearest unsaturated neighbours of a saturated core are themselves bright,
so the peak keeps its shape). ``open_scan(..., fill_saturated=False)`` keeps the stored value of
saturated pixels instead. They are flagged in ``FrameBatch.bad_pixels`` either way.

Degenerate scans are caught without an extra pass over the data: a detector dataset declared at
its full size whose frames were never written (an aborted acquisition) is found from its chunk
index when the scan is opened (nothing written: :class:`EmptyScanError`; the first frames only:
the scan is cut to them, with a :class:`PartialScanWarning`). What the frames hold (NaN/inf
pixels, frames all zero or with no good pixel) is tallied as they are read, and
:meth:`Scan.check_frames` turns the tally into :class:`BadPixelWarning` warnings, or into
:class:`NoValidPixelsError` when no pixel of any frame holds a measurement.

Frames read more than once (``dipid predict`` reads each frame for the prediction, again for the
peak table and once more for the viewer) can be kept in memory: ``open_scan(..., cache_bytes=N)``
keeps the frames read, packed (:func:`_pack_frame`: a counting detector's frame in about a quarter
of its size, packed and unpacked in a few ms where gzip takes tens), up to N bytes, and reads them
from there afterwards.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from dipid.errors import (
    BadPixelWarning,
    CorruptFileError,
    DetectorDataNotFoundError,
    EmptyScanError,
    FrameIndexError,
    LinkTargetMissingError,
    NoValidPixelsError,
    PartialScanWarning,
    ScanAxisWarning,
    ScanError,
    ScanShapeError,
    ScanWarning,
)
from dipid.io._hdf5 import FileSet, MissingTarget, frames_with_data, missing_virtual_sources, open_h5, resolve
from dipid.io.mask import check_mask_shape, read_mask
from dipid.io.nexus import (
    DetectorLocation,
    ScanAxis,
    ScanMetadata,
    find_detector_locations,
    frame_file_candidates,
    read_axis,
    read_metadata,
    tiff_names,
)
from dipid.io.pixels import bad_pixel_causes, bad_pixels, fill_bad_pixels, frame_health

logger = logging.getLogger(__name__)

__all__ = ["open_scan", "Scan", "FrameBatch", "ScanAxis", "ScanMetadata"]


@dataclass
class FrameBatch:
    """Consecutive frames of a scan.

    Attributes:
        start: index of the first frame.
        frames: (b, H, W) float32 counts, unmeasured pixels filled from neighbours.
        bad_pixels: (b, H, W) bool, static mask | negative | non-finite | >= saturation.
    """

    start: int
    frames: np.ndarray
    bad_pixels: np.ndarray

    @property
    def indices(self) -> np.ndarray:
        """(b,) int64 frame numbers."""
        return np.arange(self.start, self.start + len(self.frames), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.frames)


# --------------------------------------------------------------------------- frame sources


class _HDF5Frames:
    """Frames in one (n, H, W) HDF5 dataset; each read is one slice.

    ``declared_shape`` is the dataset's shape; ``shape`` stops after the last frame with written
    storage (``written``: (n,) bool per declared frame, None = all written), so an acquisition
    aborted early is read as the frames it wrote, not as thousands of fill-value frames.
    """

    def __init__(self, dataset: h5py.Dataset, *, scan_file: Path, path_in_scan: str):
        self.dataset = dataset
        self.declared_shape: tuple[int, ...] = tuple(dataset.shape)
        self.shape: tuple[int, int, int] = self.declared_shape  # type: ignore[assignment]
        self.written: np.ndarray | None = frames_with_data(dataset) if dataset.ndim == 3 else None
        if self.written is not None and self.written.any():
            last = int(np.flatnonzero(self.written)[-1]) + 1
            self.shape = (last, *self.declared_shape[1:])  # type: ignore[assignment]
        self.dtype = dataset.dtype
        self.scan_file = scan_file
        self.path_in_scan = path_in_scan

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            return self.dataset[start:stop]
        except (OSError, RuntimeError, ValueError) as exc:
            where = Path(self.dataset.file.filename)
            raise CorruptFileError(
                f"cannot read frames {start}..{stop - 1} of {self.dataset.name} ({exc}); the file is "
                "truncated, corrupt or compressed with a filter that is not installed (pip install hdf5plugin)",
                file=where, path_in_file=self.dataset.name,
            ) from exc


class _TiffFrames:
    """One TIFF file per frame (older I16 scans), read lazily one file at a time."""

    def __init__(self, names: list[str], candidates: list[list[Path]], first: np.ndarray, *,
                 scan_file: Path, path_in_scan: str):
        self.names = names
        self.candidates = candidates
        self.shape = (len(names), *first.shape)
        self.dtype = first.dtype
        self.scan_file = scan_file
        self.path_in_scan = path_in_scan
        self._first = first

    def _path(self, i: int) -> Path:
        found = next((c for c in self.candidates[i] if c.is_file()), None)
        if found is None:
            raise LinkTargetMissingError(
                f"frame {i} is the TIFF {self.names[i]!r}, expected at {self.candidates[i][0]}, which does "
                "not exist; copy the scan's TIFF folder next to the NeXus file",
                file=self.scan_file, path_in_file=self.path_in_scan,
            )
        return found

    def read_one(self, i: int) -> np.ndarray:
        import tifffile

        if i == 0 and self._first is not None:
            return self._first
        path = self._path(i)
        try:
            frame = tifffile.imread(path)
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types for bad files
            raise CorruptFileError(f"cannot read frame {i} ({exc})", file=path) from exc
        if frame.shape != self.shape[1:]:
            raise ScanShapeError(
                f"frame {i} has shape {frame.shape}, the first frame {self.shape[1:]}; every TIFF of a "
                "scan must have the same size", file=path,
            )
        return frame

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        for k, i in enumerate(range(start, stop)):
            out[k] = self.read_one(i)
        return out


def _load_tiff_source(files: FileSet, location: DetectorLocation) -> _TiffFrames | LinkTargetMissingError | None:
    import tifffile

    path = location.image_data_path
    assert path is not None
    names = tiff_names(files.main, path)
    if not names:
        return None
    candidates = [frame_file_candidates(files.main_path, name) for name in names]
    for i in (0, len(names) - 1):
        if not any(c.is_file() for c in candidates[i]):
            return LinkTargetMissingError(
                f"the scan lists {len(names)} TIFF frames; {names[i]!r} is expected at {candidates[i][0]}, "
                "which does not exist",
                file=files.main_path, path_in_file=path,
            )
    first_path = next(c for c in candidates[0] if c.is_file())
    try:
        first = tifffile.imread(first_path)
    except Exception as exc:  # noqa: BLE001
        raise CorruptFileError(f"cannot read the first frame ({exc})", file=first_path) from exc
    if first.ndim != 2:
        raise ScanShapeError(f"a frame TIFF must be 2D, this one has shape {first.shape}", file=first_path)
    return _TiffFrames(names, candidates, first, scan_file=files.main_path, path_in_scan=path)


def _open_source(files: FileSet, location: DetectorLocation) -> tuple[Any, str] | Callable[[], Exception]:
    """Open the frames of ``location``: (source, data path) or a factory of the error to raise."""
    missing: list[MissingTarget] = []
    for path in location.data_paths:
        obj = resolve(files, path)
        if isinstance(obj, MissingTarget):
            missing.append(obj)
        elif isinstance(obj, h5py.Dataset):
            absent = missing_virtual_sources(obj)
            if absent:
                return lambda: LinkTargetMissingError(
                    f"the frames are a virtual dataset whose source files are missing: "
                    f"{', '.join(map(str, absent[:3]))}{' ...' if len(absent) > 3 else ''}; copy them next to "
                    f"{Path(obj.file.filename).name}", file=files.main_path, path_in_file=path,
                )
            return _HDF5Frames(obj, scan_file=files.main_path, path_in_scan=path), path
    tiff_error: LinkTargetMissingError | None = None
    if location.image_data_path:
        tiffs = _load_tiff_source(files, location)
        if isinstance(tiffs, _TiffFrames):
            if missing:
                logger.info("%s: %s; reading the TIFF frames listed in %s instead", files.main_path,
                            missing[0].describe(), location.image_data_path)
            return tiffs, location.image_data_path
        tiff_error = tiffs
    if missing:
        first = missing[0]
        if tiff_error is not None:
            extra = f"the TIFF list does not help either: {tiff_error.args[0].split(': ', 1)[-1]}"
            extra += "; copy the detector files folder next to the NeXus file, keeping its name"
            return lambda: first.error(extra)
        return first.error
    if tiff_error is not None:
        return lambda: tiff_error
    return lambda: DetectorDataNotFoundError(
        f"detector {location.detector!r}: nothing readable at {', '.join(location.data_paths)}",
        file=files.main_path,
    )


# --------------------------------------------------------------------------- kept frames


class _PackedFrame(NamedTuple):
    """An integer frame packed without loss: each pixel's step above the frame's minimum as one byte,
    the steps of 255 and more (bright pixels, gap codes like 2**32 - 1) kept whole in raster order."""

    low: np.ndarray  # 0-d array of the frame's dtype: the frame's minimum
    codes: np.ndarray  # (H, W) uint8: min(count - low, 255)
    escapes: np.ndarray  # (k,) unsigned: count - low of the pixels coded 255

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.escapes.nbytes


def _pack_frame(frame: np.ndarray) -> _PackedFrame | np.ndarray:
    """(H, W) frame as stored -> its packed form; a copy for floats and foreign byte orders.

    Counting detectors' frames are mostly small counts: an Eiger 4M frame of a simulated scan
    packs into 4.5 of its 17.9 MB in about 5 ms and unpacks in 2-6 ms (gzip level 1: ~40 ms).
    """
    frame = np.ascontiguousarray(frame)
    if frame.dtype.kind not in "iu" or not frame.dtype.isnative or frame.size == 0:
        return frame.copy()
    unsigned = np.dtype(f"u{frame.dtype.itemsize}")
    low = np.asarray(frame.min())
    # the difference taken in the unsigned type is exact (modulo 2**bits, and it is below that)
    steps = frame.view(unsigned) - low.view(unsigned)
    codes = np.empty(frame.shape, np.uint8)
    np.minimum(steps, 255, out=codes, casting="unsafe")
    return _PackedFrame(low, codes, steps[codes == 255])


def _unpack_frame(packed: _PackedFrame | np.ndarray, out: np.ndarray) -> None:
    """Write the frame :func:`_pack_frame` packed into ``out`` ((H, W), the frame's dtype)."""
    if isinstance(packed, np.ndarray):
        out[...] = packed
        return
    steps = out.view(np.dtype(f"u{out.dtype.itemsize}"))
    steps[...] = packed.codes
    flat = steps.reshape(-1)
    flat[np.flatnonzero(packed.codes.reshape(-1) == 255)] = packed.escapes
    steps += packed.low.view(steps.dtype)


class _KeptFrames:
    """Frames read from a scan's file, kept packed in memory up to ``budget`` bytes (the first read
    that fit; none is dropped for a later one: passes over a scan read it in order, and keeping
    the first frames saves as many reads on each pass as keeping any others would)."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.used = 0
        self.frames: dict[int, _PackedFrame | np.ndarray] = {}
        self.full = self.budget <= 0
        self._lock = threading.Lock()  # predict_scan reads in a background thread

    def read(self, source: _HDF5Frames | _TiffFrames, start: int, stop: int) -> np.ndarray:
        """Frames start..stop-1 as stored: from memory when all are kept, else from the file (and kept)."""
        with self._lock:
            packed = [self.frames.get(i) for i in range(start, stop)]
        if stop > start and all(p is not None for p in packed):
            out = np.empty((stop - start, *source.shape[1:]), dtype=source.dtype)
            for k, p in enumerate(packed):
                _unpack_frame(p, out[k])
            return out
        raw = source.read(start, stop)
        if not self.full:
            self._keep(start, raw)
        return raw

    def _keep(self, start: int, raw: np.ndarray) -> None:
        for i, frame in enumerate(raw, start):
            if i in self.frames:
                continue
            packed = _pack_frame(frame)
            with self._lock:
                if self.used + packed.nbytes > self.budget:
                    self.full = True
                    logger.debug("scan frame cache full at %d frames (%.0f MB)", len(self.frames), self.used / 1e6)
                    return
                self.frames[i] = packed
                self.used += packed.nbytes


# --------------------------------------------------------------------------- Scan


class Scan:
    """A lazily read detector scan.

    Use :func:`open_scan`. Frames are read on demand; the HDF5 files stay open until
    :meth:`close` (or the end of a ``with`` block) and reopen by themselves if used again, in
    another process after pickling, or after a fork.

    Attributes:
        path: the scan file.
        warnings: the :class:`ScanWarning` warnings issued about this scan so far (each also
            given to ``warnings.warn`` once): frames never written, a scan axis of the wrong
            length, and, from :meth:`check_frames`, NaN pixels and empty frames.
        cache_bytes: memory for frames kept after their first read (see :func:`open_scan`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        detector: str | None = None,
        dataset: str | None = None,
        mask: str | Path | np.ndarray | None = None,
        fill_saturated: bool = True,
        cache_bytes: int = 0,
    ):
        self.path = Path(path).expanduser().absolute()
        self._detector_arg = detector
        self._dataset_arg = dataset
        self._mask_arg = mask
        self.fill_saturated = bool(fill_saturated)
        self.cache_bytes = int(cache_bytes)
        self._kept = _KeptFrames(self.cache_bytes)
        self._location: DetectorLocation | None = None
        self._reset_handles()
        self._user_mask: np.ndarray | None = None
        self.warnings: list[ScanWarning] = []
        self._tally: _FrameTally | None = None
        self._open()
        if mask is not None:
            try:
                self._user_mask = read_mask(mask)
            except Exception:
                self.close()
                raise
        if self._source is not None:
            self._validate()

    # ----- lifecycle

    def _reset_handles(self) -> None:
        self._files: FileSet | None = None
        self._source: _HDF5Frames | _TiffFrames | None = None
        self._frames_error: Callable[[], Exception] | None = None
        self._data_path: str | None = None
        self._pid: int | None = None
        self._static_mask: np.ndarray | None = None
        self._metadata: ScanMetadata | None = None
        self._axis: ScanAxis | None = None

    def _open(self) -> None:
        files = FileSet(self.path, open_h5(self.path))
        try:
            if self._location is None:
                locations = find_detector_locations(files, detector=self._detector_arg, dataset=self._dataset_arg)
                chosen, opened = locations[0], _open_source(files, locations[0])
                if not isinstance(opened, tuple) and len(locations) > 1:
                    for other in locations[1:]:
                        try:
                            attempt = _open_source(files, other)
                        except ScanError:  # a broken alternative must not hide the first one's error
                            continue
                        if isinstance(attempt, tuple):
                            logger.warning("%s: frames of %r are unavailable; reading detector %r instead",
                                           self.path, chosen.detector, other.detector)
                            chosen, opened = other, attempt
                            break
            else:
                chosen, opened = self._location, _open_source(files, self._location)
        except BaseException:
            files.close()
            raise
        self._files = files
        self._pid = os.getpid()
        if isinstance(opened, tuple):
            self._source, self._data_path = opened
            self._frames_error = None
            if self._location is None:
                # remember exactly what was read, so a reopened copy reads the same data
                chosen = chosen.with_data_path(self._data_path) if self._data_path in chosen.data_paths else chosen
        else:
            self._source = None
            self._frames_error = opened
            self._data_path = chosen.data_paths[0] if chosen.data_paths else chosen.image_data_path
        self._location = chosen

    def _validate(self) -> None:
        assert self._source is not None
        shape = self._source.shape
        where = dict(file=self._source_file(), path_in_file=self._data_path)
        if len(shape) != 3:
            self.close()
            raise ScanShapeError(
                f"detector data must be 3D (frames, rows, columns), this dataset has shape {shape}; "
                "pass dataset= pointing at an (n, H, W) dataset", **where,
            )
        if self._source.dtype.kind not in "biuf":
            self.close()
            raise ScanShapeError(f"detector data must be numeric, this dataset is {self._source.dtype}", **where)
        if shape[0] == 0:
            self.close()
            raise EmptyScanError("the scan holds 0 frames (aborted before the first point?)", **where)
        if isinstance(self._source, _HDF5Frames) and self._source.written is not None:
            self._check_written(self._source)
        if self._user_mask is not None:
            try:
                check_mask_shape(self._user_mask, shape[1:],
                                 file=None if isinstance(self._mask_arg, np.ndarray) else Path(self._mask_arg))
            except Exception:
                self.close()
                raise

    def _check_written(self, source: _HDF5Frames) -> None:
        """Stop on a dataset none of whose frames was written; warn about one partly written."""
        written = source.written
        assert written is not None
        declared = len(written)
        where = self._where()
        stored_in = self._stored_in()
        geometry = "x".join(map(str, source.declared_shape[1:]))
        if not written.any():
            self.close()
            raise EmptyScanError(
                f"the detector data is declared as {declared} frames of {geometry} {source.dtype} but no frame "
                f"was ever written{stored_in} (an aborted acquisition?): every frame would read as the fill "
                "value; nothing to process. Use the scan file of a completed acquisition", **where,
            )
        n = source.shape[0]
        count = int(written.sum())
        missing = np.flatnonzero(~written[:n])
        parts = [f"only {count} of the {declared} declared frames were written{stored_in} (an aborted acquisition?)"]
        if n < declared:
            parts.append(f"reading frames 0..{n - 1} and leaving out the {declared - n} after them, never written")
        if missing.size:
            parts.append(f"{missing.size} frame(s) among 0..{n - 1} were never written ({_frame_list(missing)}) "
                         f"and read as the fill value {source.dataset.fillvalue}")
        self._warn(PartialScanWarning, "; ".join(parts))

    def _where(self) -> dict[str, Any]:
        """file= and path_in_file= for messages about the frames: the scan file and the frames' path in it."""
        return {"file": self.path, "path_in_file": self._data_path}

    def _stored_in(self) -> str:
        """" (stored in <file> [<path>])" when the frames live in another file than the scan's."""
        if isinstance(self._source, _HDF5Frames):
            source_file = self._source_file()
            if source_file.resolve() != self.path.resolve():
                return f" (stored in {source_file} [{self._source.dataset.name}])"
        return ""

    def _warn(self, category: type[ScanWarning], message: str, **where: Any) -> None:
        """Issue a warning about this scan once (``warnings.warn``) and keep it in :attr:`warnings`."""
        warning = category(message, **(where or self._where()))
        if any(str(w) == str(warning) for w in self.warnings):
            return
        self.warnings.append(warning)
        warnings.warn(warning, stacklevel=3)

    def _source_file(self) -> Path:
        if isinstance(self._source, _HDF5Frames):
            return Path(self._source.dataset.file.filename)
        return self.path

    def _ensure_open(self) -> None:
        if self._files is None or self._pid != os.getpid():
            # after close(), unpickling or a fork: h5py handles must not be shared across processes
            self._files = None
            self._open()

    def _frames(self) -> _HDF5Frames | _TiffFrames:
        self._ensure_open()
        if self._source is None:
            assert self._frames_error is not None
            raise self._frames_error()
        return self._source

    def close(self) -> None:
        """Close the files and forget the kept frames (the scan reopens the files if used again)."""
        if self._files is not None and self._pid == os.getpid():
            self._files.close()
        self._files = None
        self._source = None
        self._kept = _KeptFrames(self.cache_bytes)

    def _read(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, H, W) frames as stored, from the kept frames or the file."""
        source = self._frames()
        if self._kept.full and not self._kept.frames:
            return source.read(start, stop)
        return self._kept.read(source, start, stop)

    def __enter__(self) -> "Scan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle h5py objects: keep what is needed to reopen the same data elsewhere.
        return {
            "path": self.path,
            "detector_arg": self._detector_arg,
            "dataset_arg": self._dataset_arg,
            # an array mask travels once, as user_mask; a file mask keeps its path for messages
            "mask_arg": None if isinstance(self._mask_arg, np.ndarray) else self._mask_arg,
            "user_mask": self._user_mask,
            "fill_saturated": self.fill_saturated,
            "cache_bytes": self.cache_bytes,
            "location": self._location,
            "data_path": self._data_path,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._detector_arg = state["detector_arg"]
        self._dataset_arg = state["dataset_arg"]
        self._mask_arg = state["mask_arg"]
        self.fill_saturated = state["fill_saturated"]
        self.cache_bytes = state.get("cache_bytes", 0)
        self._kept = _KeptFrames(self.cache_bytes)  # the frames themselves stay with the original
        self._location = state["location"]
        self._reset_handles()
        self._user_mask = state["user_mask"]
        self._data_path = state["data_path"]
        self.warnings = []
        self._tally = None

    def __repr__(self) -> str:
        try:
            shape = f"shape={self.shape}"
        except Exception:  # noqa: BLE001 - repr must not raise (frames may be missing)
            shape = "frames unavailable"
        return f"Scan({str(self.path)!r}, detector={self.detector!r}, data_path={self.data_path!r}, {shape})"

    # ----- description

    @property
    def detector(self) -> str:
        """Detector name, e.g. ``"pil3_100k"``."""
        if self._location is None:
            self._ensure_open()
        assert self._location is not None
        return self._location.detector

    @property
    def data_path(self) -> str | None:
        """HDF5 path of the frames in the scan file (the ``image_data`` dataset for TIFF lists)."""
        if self._data_path is None:
            self._ensure_open()
        return self._data_path

    @property
    def frames_available(self) -> bool:
        """True if the frames can be read (False e.g. when the linked detector file is missing)."""
        self._ensure_open()
        return self._source is not None

    def require_frames(self) -> None:
        """Raise the error that frame access would raise (e.g. LinkTargetMissingError), if any."""
        self._frames()

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n, H, W)."""
        return tuple(self._frames().shape)  # type: ignore[return-value]

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(H, W)."""
        return self.shape[1:]  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        """dtype of the stored counts (int32 for Pilatus)."""
        return np.dtype(self._frames().dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __bool__(self) -> bool:  # a Scan is truthy even when its frames are unavailable
        return True

    @property
    def metadata(self) -> ScanMetadata:
        """Scan metadata (read once, cached)."""
        if self._metadata is None:
            self._ensure_open()
            assert self._files is not None and self._location is not None
            n = self._source.shape[0] if self._source is not None else None
            self._metadata = read_metadata(self._files, self._location, n)
        return self._metadata

    @property
    def axis(self) -> ScanAxis:
        """The scanned quantity: NXdata ``axes`` -> ``primary`` attribute -> measurement axes -> frame number."""
        if self._axis is None:
            self._ensure_open()
            assert self._files is not None and self._location is not None
            n = self._source.shape[0] if self._source is not None else None
            declared = self._source.declared_shape[0] if isinstance(self._source, _HDF5Frames) else None
            mismatched: list[tuple[str, int]] = []
            axis = read_axis(self._files, self._location, n, declared=declared, mismatched=mismatched)
            if axis is None:
                axis = ScanAxis("frame", np.arange(len(self), dtype=np.float64))
                if mismatched:
                    path, length = mismatched[0]
                    self._warn(ScanAxisWarning,
                               f"the scan axis {path.rsplit('/', 1)[-1]!r} has {length} values but the scan has "
                               f"{len(self)} frames; using frame numbers 0..{len(self) - 1} as the axis instead",
                               file=self.path, path_in_file=path)
            self._axis = axis
        return self._axis

    @property
    def saturation_value(self) -> float | None:
        """Counts at or above which a pixel is saturated (see :class:`ScanMetadata`)."""
        return self.metadata.saturation_value

    @property
    def bad_pixel_mask(self) -> np.ndarray:
        """(H, W) bool static bad pixels: negative or non-finite in the first frame (unless that frame
        has no good pixel at all, which says nothing about the others), or set in the user mask."""
        if self._static_mask is None:
            first = self._read(0, 1)[0]
            with np.errstate(invalid="ignore"):
                static = first < 0
            if first.dtype.kind == "f":
                static |= ~np.isfinite(first)
            if static.all():
                # a first frame with no good pixel says nothing about which pixels are always bad;
                # each frame's own negative / non-finite pixels are still flagged
                logger.info("%s: the first frame has no good pixel; it is not used as the static bad-pixel mask",
                            self.path)
                static = np.zeros_like(static)
            if self._user_mask is not None:
                static |= self._user_mask
            static.setflags(write=False)
            self._static_mask = static
        return self._static_mask

    # ----- frames

    def _check_range(self, start: int, stop: int | None) -> tuple[int, int]:
        n = len(self)
        start = int(start)
        stop = n if stop is None else int(stop)
        if start < 0:
            start += n
        if stop < 0:
            stop += n
        if not (0 <= start <= stop <= n):
            raise FrameIndexError(
                f"frames {start}..{stop} are outside the scan: it has {n} frames (valid range 0..{n - 1}, "
                "start <= stop <= n)", file=self.path, path_in_file=self.data_path,
            )
        return start, stop

    def read_raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(stop-start, H, W) counts as stored (int32 for Pilatus), no filling; one slice read."""
        start, stop = self._check_range(start, stop)
        return self._read(start, stop)

    def _process(self, raw: np.ndarray, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """raw (b, H, W) frames number ``indices`` -> (filled float32, bad bool); tallies what they hold."""
        static = self.bad_pixel_mask
        with np.errstate(invalid="ignore"):  # NaN compares False: flagged as non-finite instead
            unmeasured = bad_pixels(raw, static_mask=static, saturation_value=None)
            saturation = self.saturation_value
            bad = unmeasured | (raw >= saturation) if saturation is not None else unmeasured
        to_fill = bad if self.fill_saturated else unmeasured
        if not (to_fill & ~static).any():
            frames = fill_bad_pixels(raw, static)  # common case: one fancy index for the batch
        else:
            frames = fill_bad_pixels(raw, to_fill)
        if self._tally is None:
            self._tally = _FrameTally(len(self))
        indices = np.asarray(indices, dtype=np.int64)
        if not self._tally.seen[indices].all():  # a frame read again holds what it held
            self._tally.add(indices, raw, bad, saturation)
        return frames, bad

    def check_frames(self, start: int = 0, stop: int | None = None) -> None:
        """Warn about what the frames read so far in ``start..stop`` hold; raise if nothing is measurable.

        Reading frames tallies, per frame, its NaN/inf pixels, whether it is all zero and whether it
        has any good pixel; this turns that tally into warnings (:class:`BadPixelWarning`, also kept
        in :attr:`warnings`) without reading anything again. Call it after streaming the frames
        (``predict_scan`` does). Frames not read yet are left out.

        Raises:
            NoValidPixelsError: every frame of the range was read and none has a good pixel (all
                NaN, dead/negative, saturated or masked), so no result would mean anything.
        """
        start, stop = self._check_range(start, stop)
        tally = self._tally
        if tally is None or stop <= start:
            return
        seen = tally.seen[start:stop]
        n_seen = int(seen.sum())
        if n_seen == 0:
            return
        frames = np.arange(start, stop)[seen]
        which = "frames" if (start, stop) == (0, len(self)) else f"frames {start}..{stop - 1}"
        no_good = tally.no_good[start:stop][seen]
        if n_seen == stop - start and no_good.all():
            causes = tally.causes[start:stop].sum(axis=0)
            raise NoValidPixelsError(
                f"no pixel of any of the {n_seen} {which} holds a measurement: "
                f"{_causes_text(causes, self.saturation_value)}; nothing can be measured. Check the detector (powered, cooled, not saturated by the direct "
                "beam) or, if this is not the detector data, pass dataset= with the right path", **self._where(),
            )
        non_finite = tally.non_finite[start:stop][seen]
        if non_finite.any():
            hit = np.count_nonzero(non_finite)
            self._warn(BadPixelWarning,
                       f"{int(non_finite.sum())} pixel(s) are NaN or infinite, in {hit} of {n_seen} {which} "
                       f"({_frame_list(frames[non_finite > 0])}); they are treated as bad pixels "
                       "(masked, and filled from their nearest good neighbours)")
        zero = tally.all_zero[start:stop][seen]
        if zero.any():
            self._warn(BadPixelWarning,
                       f"{int(zero.sum())} of {n_seen} {which} are all zero ({_frame_list(frames[zero])}): the "
                       "detector did not count (shutter closed? not triggered?); they are processed as they are")
        if no_good.any():
            self._warn(BadPixelWarning,
                       f"{int(no_good.sum())} of {n_seen} {which} have no good pixel ({_frame_list(frames[no_good])}): "
                       f"{_causes_text(tally.causes[frames[no_good]].sum(axis=0), self.saturation_value)}; "
                       "nothing is found in them")

    def __getitem__(self, index: int | slice) -> np.ndarray:
        """``scan[i]`` -> (H, W) float32 filled frame; ``scan[a:b:s]`` -> (k, H, W)."""
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._process(self._read(start, max(start, stop)), range(start, max(start, stop)))[0]
            picks = list(range(start, stop, step))
            if not picks:
                return np.empty((0, *self.frame_shape), np.float32)
            raw = np.stack([self._read(i, i + 1)[0] for i in picks])
            return self._process(raw, picks)[0]
        try:
            i = int(index)  # numpy integers too
        except TypeError:
            raise TypeError(f"scan indices must be int or slice, not {type(index).__name__}") from None
        if not -n <= i < n:
            raise FrameIndexError(
                f"frame {i} is outside the scan: it has {n} frames (valid 0..{n - 1}, or -{n}..-1)",
                file=self.path, path_in_file=self.data_path,
            )
        if i < 0:
            i += n
        return self._process(self._read(i, i + 1), [i])[0][0]

    def read_frames(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Frames by number -> ((k, H, W) float32 filled, (k, H, W) bool bad pixels).

        Negative numbers count from the end; consecutive frames are read with one slice.
        """
        n = len(self)
        picks = []
        for index in indices:
            i = int(index)
            if not -n <= i < n:
                raise FrameIndexError(
                    f"frame {i} is outside the scan: it has {n} frames (valid 0..{n - 1}, or -{n}..-1)",
                    file=self.path, path_in_file=self.data_path,
                )
            picks.append(i + n if i < 0 else i)
        if not picks:
            return np.empty((0, *self.frame_shape), np.float32), np.empty((0, *self.frame_shape), bool)
        if picks == list(range(picks[0], picks[0] + len(picks))):
            raw = self._read(picks[0], picks[0] + len(picks))
        else:
            raw = np.stack([self._read(i, i + 1)[0] for i in picks])
        return self._process(raw, picks)

    def iter_frames(self, start: int = 0, stop: int | None = None, batch: int = 16) -> Iterator[FrameBatch]:
        """Batches of consecutive frames, each read with one slice.

        Args:
            start, stop: frame range (negative counts from the end, like slicing).
            batch: frames per batch (>= 1).

        Yields:
            :class:`FrameBatch` with (b, H, W) float32 filled frames and their bad-pixel masks.
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        start, stop = self._check_range(start, stop)
        for first in range(start, stop, batch):
            raw = self._read(first, min(first + batch, stop))
            frames, bad = self._process(raw, range(first, first + len(raw)))
            yield FrameBatch(start=first, frames=frames, bad_pixels=bad)


class _FrameTally:
    """What the frames read so far held, by frame number (a frame read twice counts once)."""

    def __init__(self, n: int):
        self.seen = np.zeros(n, bool)
        self.non_finite = np.zeros(n, np.int64)
        self.all_zero = np.zeros(n, bool)
        self.no_good = np.zeros(n, bool)
        #: per frame with no good pixel: NaN/inf, negative, saturated, other (masked) pixel counts
        self.causes = np.zeros((n, 4), np.int64)

    def add(self, indices: np.ndarray, raw: np.ndarray, bad: np.ndarray, saturation: float | None) -> None:
        non_finite, all_zero, no_good = frame_health(raw, bad)
        self.seen[indices] = True
        self.non_finite[indices] = non_finite
        self.all_zero[indices] = all_zero
        self.no_good[indices] = no_good
        for k in np.flatnonzero(no_good):  # only for frames with nothing good: rare, and then cheap enough
            c = bad_pixel_causes(raw[k], saturation)
            self.causes[indices[k]] = (c["non_finite"], c["negative"], c["saturated"], c["other"])


def _frame_list(frames: np.ndarray, shown: int = 5) -> str:
    """'frame 3' / 'frames 3, 4, 9' / 'frames 3, 4, 9, 10, 11 ...'."""
    frames = np.asarray(frames)
    text = ", ".join(str(int(f)) for f in frames[:shown])
    return f"frame{'s' if len(frames) > 1 else ''} {text}{' ...' if len(frames) > shown else ''}"


def _causes_text(causes: np.ndarray, saturation: float | None) -> str:
    """Why pixels are bad, from (NaN/inf, negative, saturated, masked) counts."""
    names = ("NaN or infinite", "negative (dead or gap pixels)",
             f"at or above the saturation value {saturation:.10g}" if saturation is not None else "saturated",
             "in the bad-pixel mask")
    present = [(int(c), name) for c, name in zip(causes, names) if c > 0]
    if len(present) == 1:
        return f"every pixel is {present[0][1]}"
    return "every pixel is bad: " + ", ".join(f"{c} {name}" for c, name in present)


def open_scan(
    path: str | Path,
    *,
    detector: str | None = None,
    dataset: str | None = None,
    mask: str | Path | np.ndarray | None = None,
    fill_saturated: bool = True,
    cache_bytes: int = 0,
) -> Scan:
    """Open a scan for lazy reading.

    Args:
        path: NeXus/HDF5 scan file (``.nxs``, ``.h5``, ``.hdf``).
        detector: detector name (e.g. ``"pil3_100k"``); None = find it (area detectors preferred).
        dataset: explicit HDF5 path of the (n, H, W) frames (or of an NXdata group).
        mask: extra static bad pixels: an (H, W) array, or an .npy / TIFF / HDF5 file (nonzero = bad).
        fill_saturated: replace saturated pixels by their neighbours too (default); False keeps their stored value.
        cache_bytes: keep the frames read in memory, packed, up to this many bytes (0: none), and
            read them from there afterwards instead of decompressing them again (for code that
            reads a scan several times, as ``dipid predict`` does). The first frames read that
            fit are kept; :meth:`Scan.close` frees them.

    Returns:
        a :class:`Scan`. Its metadata and axis can be read even when the frames cannot (e.g. the
        linked detector file was not copied); frame access then raises LinkTargetMissingError.

    Raises:
        ScanFileNotFoundError, NotHDF5Error, CorruptFileError, DetectorDataNotFoundError,
        ScanShapeError, EmptyScanError, MaskFileError.
    """
    return Scan(path, detector=detector, dataset=dataset, mask=mask, fill_saturated=fill_saturated,
                cache_bytes=cache_bytes)
