"""Where a NeXus/HDF5 scan keeps its detector frames, scan axis and metadata.

Layouts handled (all seen on I16):

1. old GDA: NXdata ``entry1/<detector>`` with ``data`` (no ``signal``/``axes`` attributes; the scanned
   positioner carries ``primary="1"``), NXdetector ``entry1/instrument/<detector>``;
2. new GDA: NXdetector ``entry/instrument/<detector>/data`` and NXdata ``entry/<detector>`` with
   ``signal="data"``, ``axes=["hkl_l", ".", "."]``;
3. either of those as an HDF5 external link into ``<scan>-pilatus3_100k-files/<scan>.hdf``;
4. one TIFF per frame listed in ``<detector group>/image_data``;
5. any NXdata default signal of 3 dimensions (``default`` attributes root -> NXentry -> NXdata);
6. any 3D numeric dataset (plain HDF5 files), or an explicit ``dataset="/path"``.

Nothing here reads detector frames; it only decides where they are.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dipid.errors import DetectorDataNotFoundError
from dipid.io._hdf5 import (
    FileSet,
    MissingTarget,
    as_str,
    attr_str,
    external_target_candidates,
    attr_str_list,
    nx_class,
    read_scalar_or_array,
    resolve,
    walk_links,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AREA_DETECTOR_PATTERN",
    "DetectorLocation",
    "ScanAxis",
    "ScanMetadata",
    "find_detector_locations",
    "read_axis",
    "read_metadata",
    "list_3d_datasets",
]

#: Group names that look like an area detector (preferred when no detector is named).
AREA_DETECTOR_PATTERN = re.compile(r"^(pil|pilatus|eiger|excalibur|merlin|medipix|jungfrau|lambda)", re.IGNORECASE)

#: Saturation used for Pilatus detectors whose file does not record one (counts).
PILATUS_DEFAULT_SATURATION = 1e6


@dataclass(frozen=True)
class DetectorLocation:
    """Where one detector's frames may be read from (paths inside the scan file, all absolute).

    Attributes:
        detector: detector name, e.g. ``"pil3_100k"``.
        data_paths: paths that hold (or link to) the (n, H, W) frames, best first; they are
            alternatives for the same data.
        detector_group: the NXdetector group (saturation_value, count_time, image_data), if any.
        nxdata_group: the NXdata group plotting the frames (its ``axes`` give the scan axis), if any.
        image_data_path: a dataset of per-frame TIFF file names (older scans), if any.
        entry: the NXentry the detector belongs to, if any.
        layout: how it was found (for logs and error messages).
    """

    detector: str
    data_paths: tuple[str, ...]
    detector_group: str | None = None
    nxdata_group: str | None = None
    image_data_path: str | None = None
    entry: str | None = None
    layout: str = ""

    def with_data_path(self, path: str) -> "DetectorLocation":
        return DetectorLocation(self.detector, (path,), self.detector_group, self.nxdata_group,
                                self.image_data_path, self.entry, self.layout)


@dataclass
class ScanAxis:
    """The scanned quantity, one value per frame.

    Attributes:
        name: dataset name (e.g. ``"hkl_l"``, ``"h"``, ``"eta"``), or ``"frame"`` when the file has none.
        values: (n,) float64, in the file's units (see ``units``).
        units: the ``units`` attribute, or None.
        path: where the values were read (None for the frame-number fallback).
    """

    name: str
    values: np.ndarray
    units: str | None = None
    path: str | None = None


@dataclass
class ScanMetadata:
    """What dipid reads about a scan besides its frames.

    Attributes:
        scan_command: the GDA command line, e.g. ``"scan hkl [...] [...] [...] pil3_100k 1"``.
        detector: detector name.
        energy_kev: incident photon energy in keV (mean over the scan if it moves), or None.
        count_time_s: exposure per frame in seconds: a float when stored once, an (n,) float64 when
            stored per frame, None if absent.
        saturation_value: counts at or above which a pixel is saturated; from
            ``<detector group>/saturation_value``, else 1e6 for Pilatus detectors, else None.
        attenuator_transmission: beam transmission (0..1]: float when stored once, (n,) float64 per
            frame, None if absent.
        start_time: ISO-8601 start time as written by the beamline, or None.
        entry: the NXentry path, or None.
    """

    scan_command: str | None = None
    detector: str | None = None
    energy_kev: float | None = None
    count_time_s: float | np.ndarray | None = None
    saturation_value: float | None = None
    attenuator_transmission: float | np.ndarray | None = None
    start_time: str | None = None
    entry: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (arrays become lists)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, np.generic):
                value = value.item()
            out[name] = value
        return out


# --------------------------------------------------------------------------- discovery


def _join(*parts: str) -> str:
    return "/" + "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] or "/"


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def entries(f: h5py.File) -> list[str]:
    """NXentry group paths, the root ``default`` first, then NXentry groups, then ``entry*`` groups."""
    found: list[str] = []
    default = attr_str(f, "default")
    names = list(f.keys())
    if default and default in names:
        names.remove(default)
        names.insert(0, default)
    groups = []
    for name in names:
        try:
            link = f.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                continue
            obj = f[name]
        except (KeyError, OSError, ValueError):
            continue
        if isinstance(obj, h5py.Group):
            groups.append((name, obj))
    for name, obj in groups:
        if nx_class(obj) == "NXentry":
            found.append("/" + name)
    for name, obj in groups:
        if "/" + name not in found and name.lower().startswith("entry"):
            found.append("/" + name)
    return found


def _member_kind(files: FileSet, path: str) -> str | None:
    """'frames' if path holds or links to plausible frame data, 'external' for an unresolved link,
    None otherwise. Plausible = a 3D numeric dataset, or an external link (its target may be absent)."""
    obj = resolve(files, path)
    if isinstance(obj, MissingTarget):
        return "external"
    if isinstance(obj, h5py.Dataset) and obj.ndim == 3 and obj.dtype.kind in "biuf":
        return "frames"
    return None


def _identity(files: FileSet, path: str) -> Any:
    """Something equal for two paths reaching the same data (hard link, same external target)."""
    f = files.main
    parts = [p for p in path.split("/") if p]
    try:
        link = f[_parent(path)].get(parts[-1], getlink=True) if parts else None
    except (KeyError, OSError, ValueError):
        return path
    if isinstance(link, h5py.ExternalLink):
        return ("ext", link.filename, link.path)
    obj = resolve(files, path)
    if isinstance(obj, h5py.Dataset):
        return ("obj", obj.file.filename, hash(obj.id))
    return path


def _is_group(f: h5py.File, path: str) -> bool:
    try:
        link = f.get(path, getlink=True)
        return link is not None and not isinstance(link, h5py.ExternalLink) and isinstance(f[path], h5py.Group)
    except (KeyError, OSError, ValueError):
        return False


def _image_data_path(f: h5py.File, group: str | None) -> str | None:
    if group is None:
        return None
    path = _join(group, "image_data")
    try:
        obj = f.get(path)
    except (KeyError, OSError, ValueError):
        return None
    if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "SOU" and obj.ndim == 1:
        return path
    return None


@dataclass
class _Partial:
    name: str
    entry: str
    data_paths: list[str] = field(default_factory=list)
    detector_group: str | None = None
    nxdata_group: str | None = None
    image_data_path: str | None = None
    identities: list[Any] = field(default_factory=list)

    def location(self, layout: str) -> DetectorLocation:
        return DetectorLocation(self.name, tuple(self.data_paths), self.detector_group, self.nxdata_group,
                                self.image_data_path, self.entry, layout)


def _layout_candidates(files: FileSet) -> list[DetectorLocation]:
    """Detectors found through the NeXus layouts (1-4), area-detector names first."""
    f = files.main
    found: list[_Partial] = []
    by_key: dict[tuple[str, str], _Partial] = {}

    def partial(entry: str, name: str) -> _Partial:
        key = (entry, name)
        if key not in by_key:
            by_key[key] = _Partial(name=name, entry=entry)
            found.append(by_key[key])
        return by_key[key]

    for entry in entries(f):
        # NXdetector groups: entry/instrument/<name>/data (new layout) and .../image_data (TIFFs).
        instrument = _join(entry, "instrument")
        if _is_group(f, instrument):
            for name in f[instrument]:
                group = _join(instrument, name)
                if not _is_group(f, group):
                    continue
                data = _join(group, "data")
                kind = _member_kind(files, data) if _has_link(f, group, "data") else None
                images = _image_data_path(f, group)
                if kind is None and images is None:
                    continue
                p = partial(entry, name)
                p.detector_group = group
                if kind is not None:
                    p.data_paths.append(data)
                    p.identities.append(_identity(files, data))
                p.image_data_path = p.image_data_path or images
        # NXdata groups directly in the entry: entry/<name>/data (old layout) or their signal.
        for name in f[entry]:
            group = _join(entry, name)
            if not _is_group(f, group) or nx_class(f[group]) != "NXdata":
                continue
            signal = attr_str(f[group], "signal") or ("data" if _has_link(f, group, "data") else None)
            if not signal:
                continue
            data = _join(group, signal)
            if _member_kind(files, data) is None:
                continue
            ident = _identity(files, data)
            owner = next((p for p in found if p.entry == entry and ident in p.identities), None)
            if owner is None:
                owner = partial(entry, name)
            if owner.nxdata_group is None:
                owner.nxdata_group = group
            if data not in owner.data_paths:
                owner.data_paths.append(data)
                owner.identities.append(ident)
            if owner.detector_group is None and _is_group(f, _join(instrument, name)):
                owner.detector_group = _join(instrument, name)
            owner.image_data_path = owner.image_data_path or _image_data_path(f, group)

    # Area detectors first, keeping file order otherwise (sorted() is stable).
    ordered = sorted(found, key=lambda p: not AREA_DETECTOR_PATTERN.match(p.name))
    return [p.location("nexus") for p in ordered if p.data_paths or p.image_data_path]


def _has_link(f: h5py.File, group: str, name: str) -> bool:
    try:
        return f[group].get(name, getlink=True) is not None
    except (KeyError, OSError, ValueError):
        return False


def _default_signal_candidate(files: FileSet) -> DetectorLocation | None:
    """Layout 5: root@default -> NXentry@default -> NXdata@signal, if 3D."""
    f = files.main
    entry_name = attr_str(f, "default")
    entry = _join(entry_name) if entry_name else (entries(f) or [None])[0]
    if entry is None or not _is_group(f, entry):
        return None
    data_name = attr_str(f[entry], "default")
    if not data_name:
        return None
    group = _join(entry, data_name)
    if not _is_group(f, group):
        return None
    signal = attr_str(f[group], "signal")
    if not signal:
        return None
    data = _join(group, signal)
    if _member_kind(files, data) is None:
        return None
    detector_group = _join(entry, "instrument", data_name)
    return DetectorLocation(
        data_name, (data,),
        detector_group=detector_group if _is_group(f, detector_group) else None,
        nxdata_group=group, entry=entry, layout="NXdata default signal",
    )


def list_3d_datasets(f: h5py.File) -> list[str]:
    """Paths of every 3D numeric dataset in the file (external links not followed)."""
    out = []
    for path, obj in walk_links(f["/"]):
        if isinstance(obj, h5py.Dataset) and obj.ndim == 3 and obj.dtype.kind in "biuf":
            out.append(path)
    return out


def _any_3d_candidates(files: FileSet) -> list[DetectorLocation]:
    paths = list_3d_datasets(files.main)
    paths.sort(key=lambda p: not any(AREA_DETECTOR_PATTERN.match(part) for part in p.split("/")))
    return [_location_for_dataset(files, p, None, layout="3D dataset") for p in paths]


def _location_for_dataset(files: FileSet, path: str, detector: str | None, *, layout: str) -> DetectorLocation:
    f = files.main
    parent = _parent(path)
    name = detector or (_basename(parent) if parent != "/" else _basename(path))
    parts = [p for p in path.split("/") if p]
    entry = "/" + parts[0] if len(parts) > 1 and _is_group(f, "/" + parts[0]) else None
    detector_group = None
    nxdata_group = None
    if _is_group(f, parent) and parent != "/":
        cls = nx_class(f[parent])
        if cls == "NXdetector":
            detector_group = parent
        elif cls == "NXdata":
            nxdata_group = parent
    if detector_group is None and entry is not None and _is_group(f, _join(entry, "instrument", name)):
        detector_group = _join(entry, "instrument", name)
    if nxdata_group is None and entry is not None:
        candidate = _join(entry, name)
        if _is_group(f, candidate) and nx_class(f[candidate]) == "NXdata":
            nxdata_group = candidate
    return DetectorLocation(name, (path,), detector_group, nxdata_group, _image_data_path(f, detector_group),
                            entry, layout)


def find_detector_locations(
    files: FileSet, *, detector: str | None = None, dataset: str | None = None
) -> list[DetectorLocation]:
    """Candidate detector locations, best first (never empty).

    Order: explicit ``dataset``; explicit ``detector`` name; the NeXus layouts (area detectors
    first); the NXdata default signal; any 3D numeric dataset.

    Raises:
        DetectorDataNotFoundError: nothing found (the message lists the 3D datasets that exist).
    """
    f = files.main
    file = files.main_path
    if dataset is not None:
        path = _join(dataset)
        obj = resolve(files, path)
        if obj is None:
            raise DetectorDataNotFoundError(
                f"no dataset at this path; {_candidates_text(files)}; pass one of those as dataset=",
                file=file, path_in_file=path,
            )
        if isinstance(obj, h5py.Group):
            signal = attr_str(obj, "signal") or ("data" if "data" in obj else None)
            if signal is None:
                raise DetectorDataNotFoundError(
                    f"this is a group with no 'signal' attribute and no 'data'; {_candidates_text(files)}",
                    file=file, path_in_file=path,
                )
            path = _join(path, signal)
        return [_location_for_dataset(files, path, detector, layout="dataset=")]

    layout = _layout_candidates(files)
    if detector is not None:
        matches = [c for c in layout if c.detector == detector] or [
            c for c in layout if c.detector.lower() == detector.lower()
        ]
        if matches:
            return matches
        # detector named a group the layouts did not list (e.g. a 3D dataset elsewhere)
        for entry in entries(f):
            for group in (_join(entry, "instrument", detector), _join(entry, detector)):
                data = _join(group, "data")
                if _is_group(f, group) and _member_kind(files, data) is not None:
                    return [_location_for_dataset(files, data, detector, layout="detector=")]
        names = sorted({c.detector for c in layout})
        raise DetectorDataNotFoundError(
            f"no detector {detector!r} (looked for entry*/instrument/{detector}/data and entry*/{detector}/data); "
            f"detectors found: {', '.join(names) if names else 'none'}; {_candidates_text(files)}",
            file=file,
        )
    if layout:
        return layout
    default = _default_signal_candidate(files)
    if default is not None:
        return [default]
    any3d = _any_3d_candidates(files)
    if any3d:
        return any3d
    raise DetectorDataNotFoundError(
        f"no detector frames found: {_candidates_text(files)}; pass dataset='/path/to/frames' "
        "(an (n, H, W) dataset) or detector='<name>'",
        file=file,
    )


def _candidates_text(files: FileSet) -> str:
    paths = list_3d_datasets(files.main)
    if not paths:
        return "the file has no 3D numeric dataset"
    shown = ", ".join(f"{p} {files.main[p].shape}" for p in paths[:10])
    more = f" and {len(paths) - 10} more" if len(paths) > 10 else ""
    return f"3D datasets in the file: {shown}{more}"


# --------------------------------------------------------------------------- axis


def _axis_values(f: h5py.File, path: str, n: int | None, declared: int | None = None,
                 mismatched: list[tuple[str, int]] | None = None) -> np.ndarray | None:
    """The 1D values at ``path`` if there is one per frame (``n``); values for all ``declared``
    frames of a partly written scan are cut to the ``n`` written. A wrong length is appended to
    ``mismatched`` as (path, length) and gives None."""
    try:
        obj = f.get(path)
    except (KeyError, OSError, ValueError):
        return None
    values = read_scalar_or_array(obj)
    if values is None or values.ndim != 1:
        return None
    if n is not None and len(values) != n:
        if declared is not None and declared > n and len(values) == declared:
            return values[:n]
        logger.debug("axis %s has %d values for %d frames; ignored", path, len(values), n)
        if mismatched is not None:
            mismatched.append((path, len(values)))
        return None
    return values


def _units(f: h5py.File, path: str) -> str | None:
    try:
        return attr_str(f[path], "units")
    except (KeyError, OSError, ValueError):
        return None


def _axes_from_nxdata(f: h5py.File, group: str, n: int | None, declared: int | None = None,
                      mismatched: list[tuple[str, int]] | None = None) -> ScanAxis | None:
    if not _is_group(f, group):
        return None
    g = f[group]
    axes = attr_str_list(g, "axes")
    # axes[0] belongs to the frame dimension (the others, if named, are pixel axes).
    ordered = [a for a in axes[:1] if a not in ("", ".")]
    for name in ordered:
        values = _axis_values(f, _join(group, name), n, declared, mismatched)
        if values is not None:
            return ScanAxis(name, values, _units(f, _join(group, name)), _join(group, name))
    return None


def _primary_in_group(f: h5py.File, group: str, n: int | None, declared: int | None = None,
                      mismatched: list[tuple[str, int]] | None = None) -> ScanAxis | None:
    """Old GDA NXdata: the scanned positioner has ``primary="1"`` (and ``axis="1"``)."""
    if not _is_group(f, group):
        return None
    best: tuple[int, str] | None = None
    for name in f[group]:
        path = _join(group, name)
        try:
            obj = f[group].get(name)
        except (KeyError, OSError, ValueError):
            continue
        if not isinstance(obj, h5py.Dataset) or obj.ndim != 1:
            continue
        primary = attr_str(obj, "primary")
        axis = attr_str(obj, "axis")
        rank = 0 if primary == "1" else (1 if axis == "1" else None)
        if rank is None or (best is not None and best[0] <= rank):
            continue
        if _axis_values(f, path, n, declared, mismatched if rank == 0 else None) is not None:
            best = (rank, path)
        if rank == 0:
            break
    if best is None or best[0] != 0:
        return None  # "axis" alone marks every positioner; only "primary" says which one moved
    path = best[1]
    return ScanAxis(_basename(path), _axis_values(f, path, n, declared), _units(f, path), path)  # type: ignore[arg-type]


def read_axis(files: FileSet, location: DetectorLocation, n: int | None, *, declared: int | None = None,
              mismatched: list[tuple[str, int]] | None = None) -> ScanAxis | None:
    """The scan axis, or None when the file names none (the caller falls back to frame numbers).

    Order: the detector NXdata ``axes`` attribute; a dataset with ``primary`` in that NXdata; the
    ``axes`` of the entry's measurement / default NXdata.

    Args:
        n: number of frames; an axis must have one value per frame.
        declared: frames the detector dataset declares when only ``n`` were written; an axis of
            that length is cut to ``n``.
        mismatched: if given, the (path, length) of every named axis skipped for its length is
            appended, so the caller can say why it fell back to frame numbers.
    """
    f = files.main
    groups = [location.nxdata_group] if location.nxdata_group else []
    for group in groups:
        axis = (_axes_from_nxdata(f, group, n, declared, mismatched)
                or _primary_in_group(f, group, n, declared, mismatched))
        if axis is not None:
            return axis
    if location.entry and _is_group(f, location.entry):
        fallbacks = [_join(location.entry, "measurement")]
        default = attr_str(f[location.entry], "default")
        if default:
            fallbacks.append(_join(location.entry, default))
        for group in fallbacks:
            axis = (_axes_from_nxdata(f, group, n, declared, mismatched)
                    or _primary_in_group(f, group, n, declared, mismatched))
            if axis is not None:
                return axis
    return None


# --------------------------------------------------------------------------- metadata


def _first_existing(f: h5py.File, paths: list[str]) -> tuple[str, h5py.Dataset] | None:
    for path in paths:
        try:
            obj = f.get(path)
        except (KeyError, OSError, ValueError):
            continue
        if isinstance(obj, h5py.Dataset):
            return path, obj
    return None


def _read_text(f: h5py.File, paths: list[str]) -> str | None:
    hit = _first_existing(f, paths)
    if hit is None:
        return None
    try:
        value = hit[1][()]
    except (OSError, TypeError, ValueError):
        return None
    text = as_str(value).strip()
    return text or None


def _per_scan_or_frame(values: np.ndarray | None, n: int | None) -> float | np.ndarray | None:
    if values is None or values.size == 0:
        return None
    if values.size == 1:
        return float(values.reshape(-1)[0])
    flat = values.reshape(-1)
    if n is not None and flat.size != n:
        logger.debug("per-frame value has %d entries for %d frames; using the first", flat.size, n)
        return float(flat[0])
    return flat.astype(np.float64)


def _energy_kev(f: h5py.File, entry: str) -> float | None:
    paths = [
        _join(entry, "instrument/monochromator/energy"),
        _join(entry, "sample/beam/incident_energy"),
        _join(entry, "instrument/beam/incident_energy"),
        _join(entry, "instrument/mono/en"),
        _join(entry, "before_scan/mono/en"),
        _join(entry, "instrument/diffractometer_sample/en"),
        _join(entry, "before_scan/diffractometer_sample/en"),
    ]
    for path in paths:
        hit = _first_existing(f, [path])
        if hit is None:
            continue
        values = read_scalar_or_array(hit[1])
        if values is None or values.size == 0 or not np.isfinite(values).any():
            continue
        value = float(np.nanmean(values))
        units = (attr_str(hit[1], "units") or "").strip().lower()
        if units == "ev" or (not units and value > 200):  # GDA writes keV; > 200 keV means eV
            value /= 1000.0
        elif units in ("j", "joule"):
            value /= 1.602176634e-16
        if value > 0:
            return value
    for path in (_join(entry, "sample/beam/incident_wavelength"), _join(entry, "instrument/beam/incident_wavelength")):
        hit = _first_existing(f, [path])
        values = read_scalar_or_array(hit[1]) if hit else None
        if values is None or values.size == 0:
            continue
        wavelength = float(np.nanmean(values))
        units = (attr_str(hit[1], "units") or "angstrom").strip().lower()  # type: ignore[index]
        hc_kev = {"nm": 1.239841984, "angstrom": 12.39841984, "a": 12.39841984, "å": 12.39841984}.get(units)
        if hc_kev and wavelength > 0:
            return hc_kev / wavelength
    return None


def _saturation(f: h5py.File, location: DetectorLocation, entry: str | None) -> float | None:
    paths = []
    if location.detector_group:
        paths.append(_join(location.detector_group, "saturation_value"))
    if entry:
        paths.append(_join(entry, "instrument", location.detector, "saturation_value"))
    hit = _first_existing(f, paths)
    values = read_scalar_or_array(hit[1]) if hit else None
    if values is not None and values.size and np.isfinite(values).all():
        return float(values.reshape(-1)[0])
    if re.match(r"^(pil|pilatus)", location.detector, re.IGNORECASE):
        return PILATUS_DEFAULT_SATURATION
    return None


def read_metadata(files: FileSet, location: DetectorLocation, n: int | None) -> ScanMetadata:
    """Scan metadata from the NeXus file (fields the file lacks are None)."""
    f = files.main
    entry = location.entry
    meta = ScanMetadata(detector=location.detector, entry=entry,
                        saturation_value=_saturation(f, location, entry))
    if entry is None or not _is_group(f, entry):
        return meta
    meta.scan_command = _read_text(f, [_join(entry, "scan_command"), _join(entry, "diamond_scan/scan_command"),
                                       _join(entry, "title")])
    meta.start_time = _read_text(f, [_join(entry, "start_time"), _join(entry, "diamond_scan/start_time")])
    meta.energy_kev = _energy_kev(f, entry)
    count_paths = []
    for group in (location.detector_group, location.nxdata_group, _join(entry, "measurement")):
        if group:
            count_paths.append(_join(group, "count_time"))
    hit = _first_existing(f, count_paths)
    meta.count_time_s = _per_scan_or_frame(read_scalar_or_array(hit[1]) if hit else None, n)
    hit = _first_existing(f, [
        _join(entry, "instrument/attenuator/attenuator_transmission"),
        _join(entry, "instrument/gains_atten/Transmission"),
        _join(entry, "before_scan/gains_atten/Transmission"),
        _join(entry, "measurement/Transmission"),
    ])
    meta.attenuator_transmission = _per_scan_or_frame(read_scalar_or_array(hit[1]) if hit else None, n)
    return meta


def tiff_names(f: h5py.File, image_data_path: str) -> list[str]:
    """The per-frame TIFF file names listed in an ``image_data`` dataset."""
    values = f[image_data_path][()]
    return [as_str(v).strip() for v in np.asarray(values).reshape(-1)]


def frame_file_candidates(nexus_file: Path, name: str) -> list[Path]:
    """Where a listed TIFF may be, best first (relative names are relative to the NeXus folder)."""
    return external_target_candidates(nexus_file, name)
