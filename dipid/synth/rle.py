"""COCO RLE of a mask known only inside a small window of a large frame.

Encoding a full (H, W) mask per instance would cost H*W bytes each (4.5 MB on an Eiger 4M, for
hundreds of spots a frame); the run lengths are computed from the window instead.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def window_run_lengths(mask: np.ndarray, row0: int, col0: int, height: int, width: int) -> list[int]:
    """Uncompressed COCO run lengths (column-major, starting with a run of zeros) of a frame that
    is False except for ``mask`` placed with its top-left pixel at (row0, col0).

    Args:
        mask: (h, w) bool window, lying inside the (height, width) frame.
    Returns:
        run lengths summing to height * width.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if row0 < 0 or col0 < 0 or row0 + h > height or col0 + w > width:
        raise ValueError(f"window {mask.shape} at ({row0}, {col0}) does not fit a {height} x {width} frame")
    padded = np.zeros((h + 2, w), np.int8)
    padded[1:-1] = mask
    edges = np.diff(padded, axis=0)  # +1 where a run starts, -1 one past where it ends
    # Column-major: walk columns (axis 1) first, rows within each column.
    start_cols, start_rows = np.nonzero(edges.T == 1)
    end_cols, end_rows = np.nonzero(edges.T == -1)
    starts = (col0 + start_cols) * height + row0 + start_rows
    ends = (col0 + end_cols) * height + row0 + end_rows
    if h == height and w > 1:
        # A run ending at the bottom of one full-height column continues at the top of the next.
        keep_end = ~np.isin(ends, starts)
        keep_start = ~np.isin(starts, ends)
        starts, ends = starts[keep_start], ends[keep_end]
    total = height * width
    if len(starts) == 0:
        return [total]
    bounds = np.empty(2 * len(starts) + 2, np.int64)
    bounds[0] = 0
    bounds[1:-1:2] = starts
    bounds[2:-1:2] = ends
    bounds[-1] = total
    runs = np.diff(bounds).tolist()
    if runs[-1] == 0:  # pycocotools writes no empty run after a mask that reaches the last pixel
        runs.pop()
    return runs


def window_rle(mask: np.ndarray, row0: int, col0: int, height: int, width: int) -> dict:
    """Compressed COCO RLE dict (``counts`` as str) of a window mask placed in a full frame."""
    counts = window_run_lengths(mask, row0, col0, height, width)
    rle = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    return {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}
