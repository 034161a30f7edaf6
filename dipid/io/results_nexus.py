"""The NeXus results file: a scan's peaks, masks and provenance in one HDF5 file (no torch here).

Layout (NeXpy and nexusformat open it; ``/entry@default`` plots the 3D peak labels)::

    /                       @default="entry", @creator="dipid"
    /entry                  NXentry, @default="results"; title, start_time
      process               NXprocess: program="dipid", version, date, source_scan, models,
                            weights (NXcollection: sha256 per model), parameters (NXcollection:
                            one dataset per parameter, nested values as JSON strings),
                            parameters_json (NXnote: every parameter, exact), scan_metadata (NXnote),
                            result_metadata (NXnote: the ScanResult's metadata), scan_axis
                            (n_scan,) float64: the axis value of every frame of the scan
      results               NXdata, @signal="peak_labels", @axes=[<axis>, ".", "."]:
                            peak_labels (F, H, W) int32, <axis> (F,) float64, frame (F,) int64
      <model>_masks         NXdata per model present (tlm, ssl, joint, classical): instance_labels
                            (F, H, W) uint16 per-frame instance label images (0 = none, i + 1 =
                            instance i of that frame), same axes; ssl_masks also holds
                            segmentation (F, H, W) uint8, the SSLM's peak/background mask
      peaks                 NXdata, @signal="intensity", @axes=["id"]: one 1D dataset per
                            peak-table column (strings as variable-length UTF-8)
      instances             NXcollection: one row per per-frame instance of every model, 1D
                            columns model, frame, instance, peak, score, area, x0, y0, x1, y1,
                            row, col, source
      instance_masks        NXcollection: each instance's exact mask (label images lose the pixels
                            where instances overlap): pixels (P,) uint8, the masks inside the boxes
                            of the instances rows, each row-major, concatenated; offsets (R + 1,)
                            int64, where row r's pixels start

Volumes are gzip-compressed in chunks of one frame's 128 x 128 pixel tiles, of which only those
holding a label are written (unwritten chunks read as 0; label images are mostly empty), and are
written a frame at a time from the result's cropped instance masks (no (F, H, W) array in memory).
:func:`read_scan_result` (``ScanResult.from_nexus``) reads a file back into the ScanResult that
wrote it; files written before instance_masks, scan_axis and result_metadata existed still load
(masks from the label images, the axis of the held frames only, metadata from the process notes).
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dipid import __version__
from dipid.errors import CorruptFileError, NotHDF5Error, ScanError, ScanFileNotFoundError
from dipid.files import atomic_path, to_jsonable
from dipid.results import MODEL_KINDS, FrameStack, ImageResult, Instances, ScanResult, SSLOutput, source_flags

logger = logging.getLogger(__name__)

__all__ = ["write_results_nexus", "read_results_nexus", "read_scan_result", "ResultsFile"]

_STR = h5py.string_dtype("utf-8")
#: Units of the peak-table columns (NeXus ``units`` attributes).
_COLUMN_UNITS = {
    "centroid_frame": "frame", "first_frame": "frame", "last_frame": "frame", "frame0": "frame", "frame1": "frame",
    "centroid_row": "pixel", "centroid_col": "pixel", "row0": "pixel", "row1": "pixel", "col0": "pixel",
    "col1": "pixel", "intensity": "counts", "background": "counts", "max_counts": "counts",
}


def _safe_name(name: str) -> str:
    """An HDF5/NeXus-friendly field name: letters, digits and underscores."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", str(name)) or "_"
    return cleaned if not cleaned[0].isdigit() else f"_{cleaned}"


#: Compression of the label volumes. Label images are mostly zeros; measured on a 20-frame Eiger 4M
#: result (3 volumes, 20 x 2162 x 2068, whole-frame chunks): gzip 4 with shuffle took 2.6 s for
#: 0.8 MB, gzip 1 without shuffle 1.1 s for 3.3 MB (levels 1-3 are zlib's fast mode; shuffle
#: changes neither size). Gzip, not LZF: every HDF5 reader has it. No shuffle: chunks are
#: compressed here with zlib (see _write_label_frame), which is the whole filter pipeline.
_VOLUME_LEVEL = 1
_VOLUME_COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": _VOLUME_LEVEL, "shuffle": False}
#: Rows and columns of a volume chunk. Peaks cover well under 1 % of an Eiger 4M frame and
#: about a quarter of its 128 x 128 tiles hold any; only those are compressed and written.
_VOLUME_CHUNK = 128


def _write_volume(group: h5py.Group, name: str, volume: np.ndarray | FrameStack, dtype: Any = None,
                  *, on_frame: Callable[[int, np.ndarray], None] | None = None,
                  like: tuple[Any, list[list[tuple[tuple[int, int], bytes]]]] | None = None,
                  chunks_out: list[list[tuple[tuple[int, int], bytes]]] | None = None) -> h5py.Dataset:
    """(F, H, W) volume, gzip-compressed in one chunk per frame, written a frame at a time (so a
    :class:`FrameStack` is never built whole); ``on_frame(k, frame)`` sees each frame written.

    A volume with ``pixels(k)`` (:class:`dipid.volume.SparseFrames`) is written from each frame's
    non-zero pixels, without its dense frames (not with ``on_frame``). ``chunks_out`` collects each
    frame's compressed chunks; ``like``: (another such volume of this dtype, its ``chunks_out``),
    whose chunks are written again for every frame whose pixels are the same (the joint instances
    of a classical-only run are the classical ones).
    """
    dtype = np.dtype(volume.dtype if dtype is None else dtype).newbyteorder("=")
    shape = tuple(int(n) for n in volume.shape)
    if not all(shape):
        return group.create_dataset(name, shape=shape, dtype=dtype)
    chunk = (1, min(_VOLUME_CHUNK, shape[1]), min(_VOLUME_CHUNK, shape[2]))
    dataset = group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunk, fillvalue=0,
                                   **_VOLUME_COMPRESSION)
    pixels = getattr(volume, "pixels", None) if on_frame is None else None
    other = getattr(like[0], "pixels", None) if like is not None and pixels is not None else None
    for k in range(shape[0]):
        if pixels is not None:
            flat, values = pixels(k)
            if other is not None and all(np.array_equal(a, b) for a, b in zip((flat, values), other(k))):
                packed = like[1][k]
            else:
                tiles = _label_tiles_from_pixels(flat, values.astype(dtype, copy=False), chunk[1:], shape[1:])
                packed = [(corner, zlib.compress(tile.tobytes(), _VOLUME_LEVEL)) for corner, tile in tiles]
        else:
            frame = np.asarray(volume[k])
            tiles = _label_tiles(frame.astype(dtype, copy=False), chunk[1:])
            if on_frame is not None:
                on_frame(k, frame)
            packed = [(corner, zlib.compress(tile.tobytes(), _VOLUME_LEVEL)) for corner, tile in tiles]
        for (top, left), data in packed:
            dataset.id.write_direct_chunk((k, top, left), data)
        if chunks_out is not None:
            chunks_out.append(packed)
    return dataset


def _label_tiles(frame: np.ndarray, chunk: tuple[int, int]) -> list[tuple[tuple[int, int], np.ndarray]]:
    """The chunks of a label frame to store: ((top, left), C-contiguous (rows, cols) tile) of each
    chunk holding a non-zero label, plus the frame's first chunk, so every frame has storage (as a
    reader checking for frames never written expects); edge chunks at full size, zero-padded."""
    rows, cols = chunk
    height, width = frame.shape
    per_row = -(-width // cols)
    r, c = np.divmod(np.flatnonzero(frame.ravel() != 0), width)
    tiles = []
    for block in np.union1d(np.unique((r // rows) * per_row + c // cols), [0]).tolist():
        top, left = (block // per_row) * rows, (block % per_row) * cols
        tile = frame[top:top + rows, left:left + cols]
        if tile.shape != chunk:  # edge chunks are stored at full size
            tile = np.pad(tile, ((0, rows - tile.shape[0]), (0, cols - tile.shape[1])))
        tiles.append(((top, left), np.ascontiguousarray(tile)))
    return tiles


def _label_tiles_from_pixels(flat: np.ndarray, values: np.ndarray, chunk: tuple[int, int],
                             frame_shape: tuple[int, int]) -> list[tuple[tuple[int, int], np.ndarray]]:
    """:func:`_label_tiles` of the frame whose non-zero pixels are ``flat`` (flat indices) and
    ``values``: the same tiles, each made from its own pixels."""
    rows, cols = chunk
    width = frame_shape[1]
    per_row = -(-width // cols)
    nonzero = values != 0
    r, c = np.divmod(np.asarray(flat)[nonzero], width)
    values = values[nonzero]
    block_of = (r // rows) * per_row + c // cols
    order = np.argsort(block_of, kind="stable")
    blocks, starts = np.unique(block_of[order], return_index=True)
    runs = dict(zip(blocks.tolist(), np.split(order, starts[1:]))) if blocks.size else {}
    tiles = []
    for block in np.union1d(blocks, [0]).tolist():
        top, left = (block // per_row) * rows, (block % per_row) * cols
        tile = np.zeros(chunk, values.dtype)
        run = runs.get(block)
        if run is not None:
            tile[r[run] - top, c[run] - left] = values[run]
        tiles.append(((top, left), tile))
    return tiles


def _write_column(group: h5py.Group, name: str, values: Any) -> h5py.Dataset:
    """One table column: numbers as their numpy dtype, anything else as variable-length UTF-8."""
    if isinstance(values, list) and all(isinstance(v, str) for v in values):  # empty lists too
        return group.create_dataset(name, data=np.asarray(values, dtype=object), dtype=_STR)
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        strings = [str(v) for v in array.reshape(-1).tolist()]
        return group.create_dataset(name, data=np.asarray(strings, dtype=object).reshape(array.shape), dtype=_STR)
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    return group.create_dataset(name, data=array)


def _write_parameter(group: h5py.Group, name: str, value: Any) -> None:
    """A scalar, string or flat numeric list as a dataset; anything nested as a JSON string."""
    key = _safe_name(name)
    if isinstance(value, (bool, np.bool_)):
        group.create_dataset(key, data=np.uint8(value)).attrs["type"] = "bool"
    elif isinstance(value, (int, float, np.integer, np.floating)):
        group.create_dataset(key, data=value)
    elif isinstance(value, str):
        group.create_dataset(key, data=value, dtype=_STR)
    elif value is None:
        group.create_dataset(key, data="null", dtype=_STR).attrs["format"] = "json"
    else:
        array = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
        if array is not None and array.dtype.kind in "iuf" and array.size:
            group.create_dataset(key, data=array)
        else:
            group.create_dataset(key, data=json.dumps(to_jsonable(value)), dtype=_STR).attrs["format"] = "json"


def _set_axes(group: h5py.Group, signal: str, axis: str) -> None:
    group.attrs["signal"] = signal
    group.attrs["axes"] = [axis, ".", "."]
    group.attrs[f"{axis}_indices"] = np.int32(0)
    if axis != "frame":
        group.attrs["frame_indices"] = np.int32(0)


def _axis_datasets(group: h5py.Group, axis: str, axis_values: np.ndarray, frames: np.ndarray, long_name: str) -> None:
    group.create_dataset(axis, data=axis_values).attrs["long_name"] = long_name
    if axis != "frame":
        group.create_dataset("frame", data=frames)


def _peak_of_instances(peak_labels: np.ndarray, instance_labels: np.ndarray, boxes: np.ndarray) -> list[int]:
    """The largest 3D peak id under each instance (0 where none, or where the instance lost all its
    pixels to an earlier one in ``instance_labels``).

    Args:
        peak_labels: (H, W) int 3D peak ids of one frame; instance_labels: (H, W) int, instance i
            labelled i + 1; boxes: (N, 4) int x0, y0, x1, y1 (exclusive) of the N instances.
    Looking inside each box only keeps this linear in the instances' area, not the frame's (a
    4-megapixel frame would otherwise be sorted once per frame).
    """
    peaks = []
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.int64)):
        window = instance_labels[y0:y1, x0:x1] == i + 1
        peaks.append(int(peak_labels[y0:y1, x0:x1][window].max()) if window.any() else 0)
    return peaks


def _peak_of_pixels(peak_ids: np.ndarray, labels: np.ndarray, n: int) -> list[int]:
    """:func:`_peak_of_instances` from the instances' labelled pixels: the largest of ``peak_ids``
    (the 3D peak at each pixel) over the pixels labelled i + 1, for i < n (0 where none)."""
    peaks = np.zeros(n, np.int64)
    np.maximum.at(peaks, np.asarray(labels, np.int64) - 1, np.asarray(peak_ids, np.int64))
    return peaks.tolist()


def _instances_columns(result: ScanResult, models: Sequence[str], peaks_of: Mapping[int, list[int]],
                       peak_model: str | None) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Rows of every per-frame instance of every model: model, frame, instance (1-based label in
    ``<model>_masks``), peak (3D peak id for the model the peaks were linked from, from
    ``peaks_of``: held frame index -> the peak of each instance; else 0), score, area, box,
    centroid, source; and each row's mask crop."""
    columns: dict[str, list] = {name: [] for name in
                                ("model", "frame", "instance", "peak", "score", "area", "x0", "y0", "x1", "y1",
                                 "row", "col", "source")}
    crops: list[np.ndarray] = []
    frame_numbers = result.frame_numbers
    for model in models:
        for k, (frame, inst) in enumerate(zip(frame_numbers, result.instances(model))):
            if not len(inst):
                continue
            crops += inst.crops
            table = inst.to_dict()
            n = len(inst)
            peaks = peaks_of[k] if model == peak_model else [0] * n
            columns["model"] += [model] * n
            columns["frame"] += [int(frame)] * n
            columns["instance"] += [i + 1 for i in range(n)]
            columns["peak"] += peaks
            for name in ("score", "area", "x0", "y0", "x1", "y1", "row", "col", "source"):
                columns[name] += table[name]
    dtypes = {"frame": np.int64, "instance": np.int32, "peak": np.int32, "score": np.float32, "area": np.int64,
              "x0": np.int32, "y0": np.int32, "x1": np.int32, "y1": np.int32, "row": np.float64, "col": np.float64}
    out: dict[str, Any] = {}
    for name, values in columns.items():
        out[name] = np.asarray(values, dtype=dtypes[name]) if name in dtypes else values
    return out, crops


def write_results_nexus(
    path: str | Path,
    result: ScanResult,
    *,
    peaks: Any | None = None,
    peak_labels: np.ndarray | None = None,
    software_version: str | None = None,
    model_names: Sequence[str] | None = None,
    weights_sha256: Mapping[str, str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    label_frames: Mapping[str, Any] | None = None,
) -> Path:
    """Write a scan's predictions as a NeXus file, atomically (temp file, then ``os.replace``).

    Volumes are written a frame at a time, each frame's label images made from the result's
    cropped instance masks as it is written, so a long scan never needs an (F, H, W) array.

    Args:
        path: destination ``.nxs`` file; an existing file is replaced only once the new one is
            complete, so an interrupted write leaves the old file (or none) in place.
        result: the scan predictions; every model present gets a ``<model>_masks`` NXdata.
        peaks: a :class:`dipid.volume.Peaks3D` or a peak-table dict of columns (``/entry/peaks``).
        peak_labels: (F, H, W) int peak labels of ``result.frame_numbers`` (an array or a
            :class:`dipid.results.FrameStack`); default: those of ``peaks`` when it is a Peaks3D,
            else the joint (or first present) model's instances linked with
            :func:`dipid.volume.link_instances` (as :func:`dipid.volume.link_peaks_3d`).
        software_version: default dipid's version.
        model_names: models that produced the result; default ``result.metadata["models"]``.
        weights_sha256: model name -> checkpoint sha256; default from
            ``result.metadata["parameters"]["weights"]``.
        parameters: every setting that shaped the result; default ``result.metadata["parameters"]``.
        label_frames: model -> its (F, H, W) instance label images when already made (as
            ``result.label_frames(model)``; :func:`dipid.volume.instance_label_frames` makes them
            as their labelled pixels, which are written without dense frames); default made here.
    Returns:
        the destination path.
    """
    path = Path(path)
    frame_numbers = result.frame_numbers
    n_frames = len(frame_numbers)
    height, width = result.frame_shape
    present = result.models_present()
    table = None
    peak_model = None
    if peaks is not None:
        table = peaks.table if hasattr(peaks, "table") else dict(peaks)
        peak_model = getattr(peaks, "model", None)
        if peak_labels is None and hasattr(peaks, "label_frames"):
            peak_labels = peaks.label_frames
    if peak_labels is None:
        # Linking is dipid.volume's (a layer above io), needed only when the caller gave no peaks
        from dipid.volume import link_instances

        peak_model = "joint" if "joint" in present or not present else present[0]
        peak_labels = link_instances(result.instances(peak_model), frame_numbers, (height, width))
    if not isinstance(peak_labels, FrameStack):
        peak_labels = np.asarray(peak_labels)
    if tuple(peak_labels.shape) != (n_frames, height, width):
        raise ValueError(f"peak_labels have shape {peak_labels.shape}; the result holds {(n_frames, height, width)}")
    given = dict(label_frames or {})
    label_frames = {m: given[m] if given.get(m) is not None else result.label_frames(m) for m in present}
    # the peak of each instance of the linked model, per held frame: from the labelled pixels when
    # both label stacks have them, else found as the peak labels are written
    peak_instances = result.instances(peak_model) if peak_model in present else None
    peaks_of: dict[int, list[int]] = {}
    instance_pixels = getattr(label_frames.get(peak_model), "pixels", None)
    sparse_peaks = peak_instances is not None and instance_pixels is not None and hasattr(peak_labels, "at")
    if sparse_peaks:
        for k, inst in enumerate(peak_instances):
            if len(inst):
                flat, labels = instance_pixels(k)
                peaks_of[k] = _peak_of_pixels(peak_labels.at(k, flat), labels, len(inst))

    def instance_peaks(k: int, frame_peaks: np.ndarray) -> None:
        if peak_instances is not None and len(peak_instances[k]):
            inst = peak_instances[k]
            peaks_of[k] = _peak_of_instances(frame_peaks, inst.label_image(), inst.boxes)

    axis = _safe_name(result.axis_name or "frame")
    held_axis = result.held_axis_values()
    axis_values = held_axis if held_axis is not None else frame_numbers.astype(np.float64)
    metadata = result.metadata or {}
    if parameters is None:
        parameters = dict(metadata.get("parameters") or {})
    if model_names is None:
        model_names = list(metadata.get("models") or present)
    if weights_sha256 is None:
        weights = (parameters or {}).get("weights") or {}
        weights_sha256 = {name: info["sha256"] for name, info in weights.items()
                          if isinstance(info, Mapping) and "sha256" in info}
    if software_version is None:
        software_version = __version__
    now = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")

    with atomic_path(path) as temp:
        with h5py.File(temp, "w") as h5:
            h5.attrs["default"] = "entry"
            h5.attrs["creator"] = "dipid"
            h5.attrs["creator_version"] = str(software_version)
            h5.attrs["file_name"] = path.name
            h5.attrs["file_time"] = now
            h5.attrs["HDF5_Version"] = h5py.version.hdf5_version
            h5.attrs["h5py_version"] = h5py.version.version
            entry = h5.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            entry.attrs["default"] = "results"
            scan_name = Path(result.scan_path).name if result.scan_path else "array"
            entry.create_dataset("title", data=f"dipid peaks of {scan_name}", dtype=_STR)
            entry.create_dataset("start_time", data=now, dtype=_STR)
            _write_process(entry, result, software_version=str(software_version), date=now,
                           model_names=list(model_names), weights_sha256=dict(weights_sha256),
                           parameters=dict(parameters or {}))
            _write_results(entry, peak_labels, axis, axis_values, frame_numbers, result.axis_name or "frame",
                           on_frame=None if sparse_peaks else instance_peaks)
            written: list[tuple[Any, Any, list]] = []  # (labels, dtype, chunks) of the volumes so far
            for model in present:
                labels = label_frames[model]
                group = entry.create_group(f"{model}_masks")
                group.attrs["NX_class"] = "NXdata"
                # a frame's largest label is at most its number of instances
                most = max((len(inst) for inst in result.instances(model)), default=0)
                dtype = np.uint16 if most <= np.iinfo(np.uint16).max else np.int32
                like = next(((v, c) for v, d, c in written if d == dtype), None)
                chunks: list = []
                dataset = _write_volume(group, "instance_labels", labels, dtype, like=like, chunks_out=chunks)
                written.append((labels, dtype, chunks))
                dataset.attrs["long_name"] = f"{model} instance labels (0 = none, i + 1 = instance i of the frame)"
                if model == "ssl":
                    _write_ssl_segmentation(group, result)
                _axis_datasets(group, axis, axis_values, frame_numbers, result.axis_name or "frame")
                _set_axes(group, "instance_labels", axis)
            if table is not None:
                _write_peaks(entry, table)
            columns, crops = _instances_columns(result, present, peaks_of, peak_model)
            _write_instances(entry, columns)
            _write_instance_masks(entry, crops)
    logger.info("wrote %s (%d frames, %d peaks)", path, n_frames, int(peak_labels.max(initial=0)))
    return path


def _write_process(entry: h5py.Group, result: ScanResult, *, software_version: str, date: str,
                   model_names: list[str], weights_sha256: dict[str, str], parameters: dict[str, Any]) -> None:
    process = entry.create_group("process")
    process.attrs["NX_class"] = "NXprocess"
    process.create_dataset("program", data="dipid", dtype=_STR)
    process.create_dataset("version", data=software_version, dtype=_STR)
    process.create_dataset("date", data=date, dtype=_STR)
    process.create_dataset("source_scan", data=str(result.scan_path or ""), dtype=_STR)
    process.create_dataset("models", data=np.asarray(model_names, dtype=object), dtype=_STR)
    weights = process.create_group("weights")
    weights.attrs["NX_class"] = "NXcollection"
    for name, digest in weights_sha256.items():
        weights.create_dataset(_safe_name(name), data=str(digest), dtype=_STR).attrs["algorithm"] = "sha256"
    collection = process.create_group("parameters")
    collection.attrs["NX_class"] = "NXcollection"
    for name, value in parameters.items():
        _write_parameter(collection, name, value)
    metadata = result.metadata or {}
    for note_name, content in (("parameters_json", parameters), ("scan_metadata", metadata.get("scan", {})),
                               ("result_metadata", metadata)):
        note = process.create_group(note_name)
        note.attrs["NX_class"] = "NXnote"
        note.create_dataset("type", data="application/json", dtype=_STR)
        note.create_dataset("data", data=json.dumps(to_jsonable(content), sort_keys=True), dtype=_STR)
    scan_axis = process.create_dataset("scan_axis", data=np.asarray(result.axis_values, dtype=np.float64).reshape(-1))
    scan_axis.attrs["long_name"] = result.axis_name or "frame"


def _write_results(entry: h5py.Group, peak_labels: np.ndarray | FrameStack, axis: str, axis_values: np.ndarray,
                   frames: np.ndarray, axis_long_name: str, *,
                   on_frame: Callable[[int, np.ndarray], None] | None = None) -> None:
    group = entry.create_group("results")
    group.attrs["NX_class"] = "NXdata"
    dataset = _write_volume(group, "peak_labels", peak_labels, np.int32, on_frame=on_frame)
    dataset.attrs["long_name"] = "3D peak id (0 = none)"
    _axis_datasets(group, axis, axis_values, frames, axis_long_name)
    _set_axes(group, "peak_labels", axis)


def _write_peaks(entry: h5py.Group, table: Mapping[str, Any]) -> None:
    group = entry.create_group("peaks")
    group.attrs["NX_class"] = "NXdata"
    names = {}
    for name, values in table.items():
        key = _safe_name(name)
        names[key] = name
        dataset = _write_column(group, key, values)
        if name in _COLUMN_UNITS:
            dataset.attrs["units"] = _COLUMN_UNITS[name]
    if "intensity" in names and "id" in names:
        group.attrs["signal"] = "intensity"
        group.attrs["axes"] = ["id"]
        group.attrs["id_indices"] = np.int32(0)
    # The table's own column names and order (HDF5 sorts members by name).
    group.attrs["columns"] = json.dumps([names[key] for key in names])


def _write_instances(entry: h5py.Group, columns: Mapping[str, Any]) -> None:
    group = entry.create_group("instances")
    group.attrs["NX_class"] = "NXcollection"
    for name, values in columns.items():
        _write_column(group, name, values)
    group.attrs["columns"] = json.dumps(list(columns))


def _write_instance_masks(entry: h5py.Group, crops: Sequence[np.ndarray]) -> None:
    """Each instances row's mask crop, row-major, concatenated (see the module docstring)."""
    group = entry.create_group("instance_masks")
    group.attrs["NX_class"] = "NXcollection"
    offsets = np.concatenate([[0], np.cumsum([crop.size for crop in crops], dtype=np.int64)]).astype(np.int64)
    pixels = (np.concatenate([crop.reshape(-1) for crop in crops]) if crops else np.zeros(0, bool)).astype(np.uint8)
    options = {"compression": "gzip", "compression_opts": 4, "shuffle": True} if pixels.size else {}
    dataset = group.create_dataset("pixels", data=pixels, **options)
    dataset.attrs["long_name"] = ("instance masks inside their boxes (y1 - y0, x1 - x0), row-major, "
                                  "in /entry/instances order")
    group.create_dataset("offsets", data=offsets).attrs["long_name"] = "start of each instances row in pixels"


def _write_ssl_segmentation(group: h5py.Group, result: ScanResult) -> None:
    """The SSLM's peak/background mask of each held frame (zeros where the SSLM did not run)."""
    held = [result.frames[int(f)] for f in result.frame_numbers]

    def mask(k: int) -> np.ndarray:
        ssl = held[k].ssl
        return np.zeros(result.frame_shape, np.uint8) if ssl is None else ssl.mask

    masks = FrameStack(mask, len(held), result.frame_shape, np.uint8)
    _write_volume(group, "segmentation", masks).attrs["long_name"] = "SSLM peak/background segmentation (1 = peak)"


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class ResultsFile:
    """What :func:`read_results_nexus` reads back.

    Attributes:
        path: the file.
        axis_name: the scan axis.
        axis_values: (F,) float64 axis value of each held frame.
        frame_numbers: (F,) int64 frame numbers.
        peak_labels: (F, H, W) int32 3D peak labels.
        peaks: the peak table (column -> numpy array; strings as lists of str), {} when absent.
        model_labels: model -> (F, H, W) per-frame instance label volumes.
        instances: per-frame instance columns (strings as lists of str).
        parameters: every recorded parameter (exact, from the JSON note).
        models: model names recorded; weights_sha256: model -> sha256.
        software_version, date, source_scan: provenance.
        scan_metadata: the scan's metadata dict.
        result_metadata: the ScanResult's metadata (None in files written before it was recorded).
        scan_axis_values: (n_scan,) float64 axis value of every frame of the scan (None in older files).
        instance_crops: each ``instances`` row's exact mask inside its box (None in older files).
        ssl_segmentation: (F, H, W) bool SSLM peak/background masks (None when absent).
    """

    path: Path
    axis_name: str
    axis_values: np.ndarray
    frame_numbers: np.ndarray
    peak_labels: np.ndarray
    peaks: dict[str, Any] = field(default_factory=dict)
    model_labels: dict[str, np.ndarray] = field(default_factory=dict)
    instances: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    weights_sha256: dict[str, str] = field(default_factory=dict)
    software_version: str = ""
    date: str = ""
    source_scan: str = ""
    scan_metadata: dict[str, Any] = field(default_factory=dict)
    result_metadata: dict[str, Any] | None = None
    scan_axis_values: np.ndarray | None = None
    instance_crops: list[np.ndarray] | None = None
    ssl_segmentation: np.ndarray | None = None

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (int(self.peak_labels.shape[1]), int(self.peak_labels.shape[2]))

    def to_scan_result(self) -> ScanResult:
        """The ScanResult this file was written from (see :func:`read_scan_result`)."""
        table = self.instances
        rows: dict[tuple[str, int], list[int]] = {}
        for r, (model, frame) in enumerate(zip(table.get("model", []), table.get("frame", []))):
            rows.setdefault((str(model), int(frame)), []).append(r)
        shape = self.frame_shape
        frames: dict[int, ImageResult] = {}
        for k, frame in enumerate(self.frame_numbers.tolist()):
            found = {model: self._instances(model, k, rows.get((model, frame), [])) for model in self.model_labels}
            ssl = None
            if "ssl" in found:
                mask = (self.ssl_segmentation[k] if self.ssl_segmentation is not None
                        else found["ssl"].union_mask())
                ssl = SSLOutput(probability=None, mask=mask, instances=found["ssl"])
            frames[frame] = ImageResult(frame=frame, shape=shape, joint=found.get("joint", Instances.empty(shape)),
                                        tlm=found.get("tlm"), ssl=ssl, classical=found.get("classical"))
        if self.scan_axis_values is not None:
            axis_values = self.scan_axis_values
        else:  # older files hold the held frames' values only; the other frames' are unknown
            axis_values = np.full(int(self.frame_numbers.max(initial=-1)) + 1, np.nan)
            axis_values[self.frame_numbers] = self.axis_values
        metadata = (self.result_metadata if self.result_metadata is not None
                    else {"scan": self.scan_metadata, "models": list(self.models), "parameters": self.parameters})
        return ScanResult(frames=frames, axis_name=self.axis_name, axis_values=axis_values, frame_shape=shape,
                          scan_path=self.source_scan or None, metadata=metadata)

    def _instances(self, model: str, k: int, rows: list[int]) -> Instances:
        """``model``'s instances of held frame k from the instances rows, in instance order."""
        table = self.instances
        rows = sorted(rows, key=lambda r: int(table["instance"][r]))
        corners = [[int(table[c][r]) for c in ("x0", "y0", "x1", "y1")] for r in rows]
        boxes = np.asarray(corners, np.int32).reshape(-1, 4)
        if self.instance_crops is not None:
            crops = [self.instance_crops[r] for r in rows]
        else:  # older files: the label image, where an overlapped instance lost pixels to an earlier one
            labels = self.model_labels[model][k]
            crops = [labels[y0:y1, x0:x1] == int(table["instance"][r]) for r, (x0, y0, x1, y1) in zip(rows, boxes)]
        scores = np.asarray([table["score"][r] for r in rows], np.float32)
        sources = np.asarray([source_flags(table["source"][r]) for r in rows], np.uint8)
        return Instances(boxes, crops, scores, sources, self.frame_shape)


def _read_column(dataset: h5py.Dataset) -> Any:
    if h5py.check_string_dtype(dataset.dtype) is not None:
        values = dataset.asstr()[()]
        return [str(v) for v in np.atleast_1d(values)] if dataset.shape else str(values)
    return dataset[()]


def _read_table(group: h5py.Group | None) -> dict[str, Any]:
    if group is None:
        return {}
    order = json.loads(group.attrs["columns"]) if "columns" in group.attrs else list(group)
    names = {_safe_name(name): name for name in order}
    names.update({key: key for key in group if key not in names})  # columns added by other tools
    return {name: _read_column(group[key]) for key, name in names.items()
            if key in group and isinstance(group[key], h5py.Dataset)}


def _text(group: h5py.Group, name: str) -> str:
    return str(group[name].asstr()[()]) if name in group else ""


def read_scan_result(path: str | Path) -> ScanResult:
    """Read a file written by :func:`write_results_nexus` back into a :class:`ScanResult`
    (``ScanResult.from_nexus``): the held frames with each model's instances (masks, scores,
    sources), the axis, the frame shape, the scan path and the metadata.

    Not stored, so not read back: the SSLM probability maps (``probability`` is None), the frames'
    bad-pixel masks and timings. A model present in some frames is present (empty) in all. Files
    written before the exact masks were stored give the masks of the label images (an instance
    overlapped by an earlier one lacks the shared pixels) and NaN axis values for frames not held.

    Raises:
        the errors of :func:`read_results_nexus`.
    """
    return read_results_nexus(path).to_scan_result()


def read_results_nexus(path: str | Path) -> ResultsFile:
    """Read a file written by :func:`write_results_nexus` (used by ``dipid view RESULT.nxs``); for
    the ScanResult that wrote it, :func:`read_scan_result`.

    Raises:
        ScanFileNotFoundError: no such file; NotHDF5Error: not HDF5; CorruptFileError: truncated;
        ScanError: HDF5 but not a dipid results file (the message names the missing path).
    """
    path = Path(path)
    if not path.is_file():
        raise ScanFileNotFoundError("no such results file; write one with dipid.io.results_nexus.write_results_nexus "
                                    "or `dipid predict ... --out RESULT.nxs`", file=path)
    if not h5py.is_hdf5(path):
        raise NotHDF5Error("not an HDF5/NeXus file; pass a .nxs results file written by dipid", file=path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise CorruptFileError(f"HDF5 file cannot be opened ({exc}); it is truncated or damaged: write it again",
                               file=path) from exc
    with h5:
        results = h5.get("entry/results")
        if results is None or "peak_labels" not in results:
            raise ScanError("not a dipid results file (no peak_labels): pass a file written by "
                            "`dipid predict ... --out RESULT.nxs`", file=path, path_in_file="/entry/results/peak_labels")
        entry = h5["entry"]
        axes = [a.decode() if isinstance(a, bytes) else str(a) for a in np.atleast_1d(results.attrs.get("axes", ["frame"]))]
        axis = axes[0]
        frames = results["frame"][()] if "frame" in results else np.arange(results["peak_labels"].shape[0])
        axis_name = results[axis].attrs.get("long_name", axis) if axis in results else axis
        out = ResultsFile(
            path=path,
            axis_name=axis_name.decode() if isinstance(axis_name, bytes) else str(axis_name),
            axis_values=np.asarray(results[axis][()], dtype=np.float64) if axis in results else frames.astype(np.float64),
            frame_numbers=np.asarray(frames, dtype=np.int64),
            peak_labels=np.asarray(results["peak_labels"][()], dtype=np.int32),
        )
        out.peaks = _read_table(entry.get("peaks"))
        out.instances = _read_table(entry.get("instances"))
        for model in MODEL_KINDS:
            group = entry.get(f"{model}_masks")
            if group is not None and "instance_labels" in group:
                out.model_labels[model] = group["instance_labels"][()]
                if "segmentation" in group:
                    out.ssl_segmentation = group["segmentation"][()].astype(bool)
        out.instance_crops = _read_crops(entry.get("instance_masks"), out.instances, path)
        process = entry.get("process")
        if process is not None:
            out.software_version = _text(process, "version")
            out.date = _text(process, "date")
            out.source_scan = _text(process, "source_scan")
            if "models" in process:
                out.models = [str(m) for m in np.atleast_1d(process["models"].asstr()[()])]
            if "weights" in process:
                out.weights_sha256 = {name: _text(process["weights"], name) for name in process["weights"]}
            if "parameters_json" in process:
                out.parameters = json.loads(_text(process["parameters_json"], "data"))
            if "scan_metadata" in process:
                out.scan_metadata = json.loads(_text(process["scan_metadata"], "data"))
            if "result_metadata" in process:
                out.result_metadata = json.loads(_text(process["result_metadata"], "data"))
            if "scan_axis" in process:
                out.scan_axis_values = np.asarray(process["scan_axis"][()], dtype=np.float64)
    return out


def _read_crops(group: h5py.Group | None, table: Mapping[str, Any], path: Path) -> list[np.ndarray] | None:
    """Each instances row's mask crop from ``/entry/instance_masks``; None when the file has none."""
    if group is None:
        return None
    pixels = group["pixels"][()].astype(bool)
    offsets = group["offsets"][()]
    n_rows = len(table.get("model", []))
    if len(offsets) != n_rows + 1:
        raise ScanError(f"instance_masks has offsets for {len(offsets) - 1} instances but the instances table "
                        f"has {n_rows} rows: the file is damaged, write it again", file=path,
                        path_in_file="/entry/instance_masks/offsets")
    crops = []
    for r in range(n_rows):
        height = int(table["y1"][r]) - int(table["y0"][r])
        width = int(table["x1"][r]) - int(table["x0"][r])
        crops.append(pixels[offsets[r]:offsets[r + 1]].reshape(height, width))
    return crops
