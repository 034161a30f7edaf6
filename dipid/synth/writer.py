"""Write a simulated scan as an I16 NeXus file (new GDA layout) plus COCO labels.

Layout (``<det>`` is ``pil3_100k`` for the Pilatus, ``eiger4m`` for the Eiger)::

    /                                       @default = "entry"
    entry                  NXentry          @default = "<det>"
      diamond_scan/scan_command             "scan eta 10 12 0.033 pil3_100k 1"
      instrument           NXinstrument
        <det>              NXdetector
          data             int32 (n, H, W), chunks (1, H, W), gzip 1
          saturation_value float64 scalar
          count_time       float64 (n,)   @units = "s"
          sensor_material  "Silicon"
        attenuator         NXattenuator
          attenuator_transmission  float64 (n,)
      sample               NXsample
        beam               NXbeam
          incident_energy  float64 scalar @units = "keV"
      <det>                NXdata           @signal = "data", @axes = ["eta", ".", "."]
        data               hard link to entry/instrument/<det>/data
        eta                float64 (n,)   @units = "deg"

String attributes are fixed-length bytes as GDA writes them. Files carry no timestamps, so the
same scan written twice gives identical bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from dipid.files import atomic_path
from dipid.io.coco import write_coco

if TYPE_CHECKING:  # annotations only: the simulator imports this writer
    from dipid.synth.scan import SimulatedScan


@dataclass(frozen=True)
class SimulatedFiles:
    """Files written for one simulated scan: the NeXus scan and its COCO labels."""

    nexus: Path
    labels: Path


def _nx(group: h5py.Group, nx_class: str) -> h5py.Group:
    group.attrs["NX_class"] = np.bytes_(nx_class)
    return group


def _dataset(group: h5py.Group, name: str, data, *, units: str | None = None, **kwargs) -> h5py.Dataset:
    ds = group.create_dataset(name, data=data, track_times=False, **kwargs)
    if units is not None:
        ds.attrs["units"] = np.bytes_(units)
    return ds


def scan_command(scan: SimulatedScan) -> str:
    """GDA-style command that would have produced the scan, e.g. ``scan eta 10 12 0.02 pil3_100k 1``."""
    values = scan.axis_values
    step = float(values[1] - values[0]) if len(values) > 1 else 0.0
    return (f"scan {scan.axis_name} {float(values[0]):g} {float(values[-1]):g} {round(step, 6):g} "
            f"{scan.detector_spec.name} {float(scan.count_time[0]):g}")


def _fill_nexus(f: h5py.File, scan: SimulatedScan) -> None:
    det_name = scan.detector_spec.name
    n, h, w = scan.frames.shape
    f.attrs["default"] = np.bytes_("entry")
    entry = _nx(f.create_group("entry"), "NXentry")
    entry.attrs["default"] = np.bytes_(det_name)
    _dataset(entry, "definition", "NXmx" if scan.detector_spec.eiger_scene is not None else "NXxbase")

    diamond_scan = _nx(entry.create_group("diamond_scan"), "NXcollection")
    _dataset(diamond_scan, "scan_command", scan_command(scan))
    _dataset(diamond_scan, "scan_shape", np.array([n], np.int32))

    instrument = _nx(entry.create_group("instrument"), "NXinstrument")
    detector = _nx(instrument.create_group(det_name), "NXdetector")
    data = _dataset(detector, "data", scan.frames.astype(np.int32, copy=False), chunks=(1, h, w),
                    compression="gzip", compression_opts=1, shuffle=True)
    _dataset(detector, "saturation_value", float(scan.saturation_value))
    _dataset(detector, "count_time", scan.count_time.astype(np.float64), units="s")
    _dataset(detector, "sensor_material", "Silicon")
    _dataset(detector, "x_pixel_size", scan.detector_spec.pixel_size_mm, units="mm")
    _dataset(detector, "y_pixel_size", scan.detector_spec.pixel_size_mm, units="mm")
    if scan.geometry is not None:
        _dataset(detector, "distance", scan.geometry.camera_length_mm, units="mm")
        _dataset(detector, "beam_center_x", scan.geometry.beam_col, units="pixel")
        _dataset(detector, "beam_center_y", scan.geometry.beam_row, units="pixel")
    attenuator = _nx(instrument.create_group("attenuator"), "NXattenuator")
    _dataset(attenuator, "attenuator_transmission", scan.attenuator_transmission.astype(np.float64))

    sample = _nx(entry.create_group("sample"), "NXsample")
    beam = _nx(sample.create_group("beam"), "NXbeam")
    _dataset(beam, "incident_energy", float(scan.energy_kev), units="keV")

    nxdata = _nx(entry.create_group(det_name), "NXdata")
    nxdata.attrs["signal"] = np.bytes_("data")
    nxdata.attrs["axes"] = np.array([scan.axis_name, ".", "."], dtype="S")
    nxdata.attrs[f"{scan.axis_name}_indices"] = np.array([0], np.int32)
    nxdata["data"] = data  # hard link: one dataset, two paths
    _dataset(nxdata, scan.axis_name, scan.axis_values.astype(np.float64), units="deg")


def write_nexus(scan: SimulatedScan, path: str | Path) -> Path:
    """Write the scan's frames and metadata to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    with atomic_path(path) as temp, h5py.File(temp, "w-", track_order=False) as f:
        _fill_nexus(f, scan)
    return path


def write_scan(scan: SimulatedScan, out_dir: Path, name: str) -> SimulatedFiles:
    """Write ``<name>.nxs`` and ``<name>_labels.json`` into ``out_dir``; renames the labels' scan."""
    if not name or "/" in name or "\\" in name or "#" in name:
        raise ValueError(f"name must be a plain file stem without '/', '\\' or '#', got {name!r}")
    nexus = write_nexus(scan, out_dir / f"{name}.nxs")
    scan.labels = [dataclasses.replace(fl, scan=nexus.name) for fl in scan.labels]
    description = f"dipid simulated scan: preset {scan.preset}, detector {scan.detector}, seed {scan.seed}"
    labels = write_coco(scan.labels, out_dir / f"{name}_labels.json", description=description)
    return SimulatedFiles(nexus=nexus, labels=labels)
