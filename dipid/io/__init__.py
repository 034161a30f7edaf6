"""Reading scans and labels (no torch here).

- :func:`open_scan` / :class:`Scan`: lazy access to detector frames in NeXus/HDF5 (and TIFF-list)
  scans, with bad pixels filled (:func:`fill_bad_pixels`).
- :mod:`dipid.io.coco`: per-frame instance labels as COCO JSON.
"""

from __future__ import annotations

from dipid.io.coco import FrameLabels, LabelSet, read_coco, write_coco
from dipid.io.pixels import bad_pixels, fill_bad_pixels
from dipid.io.scan import FrameBatch, Scan, ScanAxis, ScanMetadata, open_scan

__all__ = [
    "open_scan",
    "Scan",
    "ScanAxis",
    "ScanMetadata",
    "FrameBatch",
    "fill_bad_pixels",
    "bad_pixels",
    "FrameLabels",
    "LabelSet",
    "read_coco",
    "write_coco",
]
