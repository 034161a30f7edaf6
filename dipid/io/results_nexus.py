"""The NeXus results file: a scan's peaks, masks and provenance in one HDF5 file (no torch here).

Layout (NeXpy and nexusformat open it; ``/entry@default`` plots the 3D peak labels)::

    /                       @default="entry", @creator="dipid"
    /entry                  NXentry, @default="results"; title, start_time
      process               NXprocess: program="dipid", version, date, source_scan, models,
                            weights (NXcollection: sha256 per model), parameters (NXcollection:
                            one dataset per parameter, nested values as JSON strings),
                            parameters_json (NXnote: every parameter, exact), scan_metadata (NXnote)
      results               NXdata, @signal="peak_labels", @axes=[<axis>, ".", "."]:
                            peak_labels (F, H, W) int32, <axis> (F,) float64, frame (F,) int64
      <model>_masks         NXdata per model present (tlm, ssl, joint, classical): instance_labels
                            (F, H, W) uint16 per-frame instance label images (0 = none, i + 1 =
                            instance i of that frame), same axes
      peaks                 NXdata, @signal="intensity", @axes=["id"]: one 1D dataset per
                            peak-table column (strings as variable-length UTF-8)
      instances             NXcollection: one row per per-frame instance of every model, 1D
                            columns model, frame, instance, peak, score, area, x0, y0, x1, y1,
                            row, col, source

Volumes are gzip-compressed in one chunk per frame, so a viewer reads a frame at a time.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dipid.errors import CorruptFileError, NotHDF5Error, ScanError, ScanFileNotFoundError
from dipid.files import atomic_path, to_jsonable
from dipid.results import MODEL_KINDS, ScanResult

logger = logging.getLogger(__name__)

__all__ = ["write_results_nexus", "read_results_nexus", "ResultsFile"]

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


def _models_present(result: ScanResult) -> list[str]:
    present = []
    for kind in MODEL_KINDS:
        if any(getattr(frame, kind) is not None for frame in result.frames.values()):
            present.append(kind)
    return present


def _write_volume(group: h5py.Group, name: str, volume: np.ndarray) -> h5py.Dataset:
    """(F, H, W) volume, gzip-compressed in one chunk per frame."""
    if volume.size == 0:
        return group.create_dataset(name, data=volume)
    return group.create_dataset(
        name, data=volume, chunks=(1, *volume.shape[1:]), compression="gzip", compression_opts=4, shuffle=True
    )


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


def _instances_columns(result: ScanResult, models: Sequence[str], peak_labels: np.ndarray | None,
                       peak_model: str | None) -> dict[str, Any]:
    """Rows of every per-frame instance of every model: model, frame, instance (1-based label in
    ``<model>_masks``), peak (3D peak id for the model the peaks were linked from, else 0), score,
    area, box, centroid, source."""
    columns: dict[str, list] = {name: [] for name in
                                ("model", "frame", "instance", "peak", "score", "area", "x0", "y0", "x1", "y1",
                                 "row", "col", "source")}
    frame_numbers = result.frame_numbers
    for model in models:
        for k, frame in enumerate(frame_numbers):
            inst = result.frames[int(frame)].instances(model)
            if not len(inst):
                continue
            table = inst.to_dict()
            n = len(inst)
            peaks = [0] * n
            if peak_labels is not None and model == peak_model:
                peaks = _peak_of_instances(peak_labels[k], inst.label_image(), inst.boxes)
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
    return out


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
) -> Path:
    """Write a scan's predictions as a NeXus file, atomically (temp file, then ``os.replace``).

    Args:
        path: destination ``.nxs`` file; an existing file is replaced only once the new one is
            complete, so an interrupted write leaves the old file (or none) in place.
        result: the scan predictions; every model present gets a ``<model>_masks`` NXdata.
        peaks: a :class:`dipid.volume.Peaks3D` or a peak-table dict of columns (``/entry/peaks``).
        peak_labels: (F, H, W) int peak labels of ``result.frame_numbers``; default: those of
            ``peaks`` when it is a Peaks3D, else the joint (or first present) model's instances
            linked with :func:`dipid.volume.link_peaks_3d`.
        software_version: default dipid's version.
        model_names: models that produced the result; default ``result.metadata["models"]``.
        weights_sha256: model name -> checkpoint sha256; default from
            ``result.metadata["parameters"]["weights"]``.
        parameters: every setting that shaped the result; default ``result.metadata["parameters"]``.
    Returns:
        the destination path.
    """
    from dipid.volume import link_peaks_3d, stack_labels

    path = Path(path)
    frame_numbers = result.frame_numbers
    n_frames = len(frame_numbers)
    height, width = result.frame_shape
    present = _models_present(result)
    table = None
    peak_model = None
    if peaks is not None:
        table = peaks.table if hasattr(peaks, "table") else dict(peaks)
        peak_model = getattr(peaks, "model", None)
        if peak_labels is None and hasattr(peaks, "labels"):
            peak_labels = peaks.labels
    if peak_labels is None:
        peak_model = "joint" if "joint" in present or not present else present[0]
        per_frame = [result.frames[int(f)].instances(peak_model) for f in frame_numbers]
        peak_labels = link_peaks_3d(stack_labels(per_frame, (height, width)), frame_numbers=frame_numbers)
    peak_labels = np.asarray(peak_labels)
    if peak_labels.shape != (n_frames, height, width):
        raise ValueError(f"peak_labels have shape {peak_labels.shape}; the result holds {(n_frames, height, width)}")
    peak_labels = peak_labels.astype(np.int32, copy=False)

    axis = _safe_name(result.axis_name or "frame")
    all_axis = np.asarray(result.axis_values, dtype=np.float64)
    axis_values = (all_axis[frame_numbers] if n_frames and len(all_axis) > frame_numbers.max()
                   else frame_numbers.astype(np.float64))
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
        from dipid import __version__ as software_version
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
            _write_results(entry, peak_labels, axis, axis_values, frame_numbers, result.axis_name or "frame")
            for model in present:
                per_frame = [result.frames[int(f)].instances(model) for f in frame_numbers]
                labels = stack_labels(per_frame, (height, width))
                group = entry.create_group(f"{model}_masks")
                group.attrs["NX_class"] = "NXdata"
                dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.int32
                dataset = _write_volume(group, "instance_labels", labels.astype(dtype))
                dataset.attrs["long_name"] = f"{model} instance labels (0 = none, i + 1 = instance i of the frame)"
                _axis_datasets(group, axis, axis_values, frame_numbers, result.axis_name or "frame")
                _set_axes(group, "instance_labels", axis)
            if table is not None:
                _write_peaks(entry, table)
            _write_instances(entry, _instances_columns(result, present, peak_labels, peak_model))
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
    for note_name, content in (("parameters_json", parameters), ("scan_metadata", (result.metadata or {}).get("scan", {}))):
        note = process.create_group(note_name)
        note.attrs["NX_class"] = "NXnote"
        note.create_dataset("type", data="application/json", dtype=_STR)
        note.create_dataset("data", data=json.dumps(to_jsonable(content), sort_keys=True), dtype=_STR)


def _write_results(entry: h5py.Group, peak_labels: np.ndarray, axis: str, axis_values: np.ndarray,
                   frames: np.ndarray, axis_long_name: str) -> None:
    group = entry.create_group("results")
    group.attrs["NX_class"] = "NXdata"
    dataset = _write_volume(group, "peak_labels", peak_labels)
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

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (int(self.peak_labels.shape[1]), int(self.peak_labels.shape[2]))


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


def read_results_nexus(path: str | Path) -> ResultsFile:
    """Read a file written by :func:`write_results_nexus` (used by ``dipid view RESULT.nxs``).

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
    return out
