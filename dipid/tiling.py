"""Large frames in overlapping tiles, and instances merged back across tile borders.

An Eiger 4M frame (2162 x 2068) is far larger than the networks' working size; it is cut into
tiles of at most ``tile`` pixels a side that overlap by ``overlap`` pixels, each tile is predicted
on its own (memory bounded by the tile, not the frame), and the instances are moved back to
frame coordinates. A peak on a tile border is seen by both tiles: whole in one or both when it is
smaller than the overlap, in pieces when larger. Each tile keeps only the instances whose
centroid lies in its core (:func:`in_core`; this also drops the artefacts a model makes at a
tile's cut edge), and :func:`merge_tiled_instances` joins any two instances from different tiles
whose masks share a pixel, which re-assembles a large peak's pieces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dipid.results import Instances

__all__ = [
    "Tile", "tile_grid", "peak_windows", "in_core", "shift_instances", "window_instances", "merge_tiled_instances",
]


@dataclass(frozen=True)
class Tile:
    """One tile: rows ``y0:y1`` and columns ``x0:x1`` of the frame.

    Its core, rows ``core_y0:core_y1`` and columns ``core_x0:core_x1``, is the part closer to this
    tile's centre than to any neighbour's (cut at the middle of each overlap); the cores of a grid
    partition the frame, so each instance is kept by the one tile whose core holds its centroid.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    core_y0: int = 0
    core_y1: int = 0
    core_x0: int = 0
    core_x1: int = 0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def _axis_tiles(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, core_start, core_stop) along one axis; tiles evenly spread, all full size."""
    if length <= tile:
        return [(0, length, 0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    starts = np.round(np.linspace(0, length - tile, n)).astype(int).tolist()
    stops = [s + tile for s in starts]
    cuts = [0, *[(starts[i + 1] + stops[i]) // 2 for i in range(n - 1)], length]
    return [(starts[i], stops[i], cuts[i], cuts[i + 1]) for i in range(n)]


def tile_grid(shape: tuple[int, int], *, tile: int = 512, overlap: int = 64) -> list[Tile]:
    """Tiles of at most ``tile`` x ``tile`` pixels covering ``shape``, neighbours sharing at least ``overlap`` pixels."""
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile})")
    h, w = shape
    return [Tile(y0, y1, x0, x1, cy0, cy1, cx0, cx1)
            for y0, y1, cy0, cy1 in _axis_tiles(h, tile, overlap) for x0, x1, cx0, cx1 in _axis_tiles(w, tile, overlap)]


def peak_windows(boxes: np.ndarray, shape: tuple[int, int], *, margin: int, align: int = 32) -> list[Tile]:
    """The windows of a frame the networks need to see to judge peaks at ``boxes``.

    Each box (x0, y0, x1, y1; exclusive ends, frame pixels) is grown by ``margin`` pixels on every
    side and its edges moved out to the next multiple of ``align`` (clipped to the frame);
    windows that overlap are replaced by their bounding box until none do. Snapping to the grid
    of the networks' coarsest stride keeps a window's feature cells on the whole frame's cells,
    so a peak well inside its window is seen as on the whole frame; the margin is its context.

    Args:
        boxes: (N, 4) int boxes; N may be 0 (no window).
        shape: the frame's (H, W).
        margin: context around each box, pixels (>= 0).
        align: grid the window edges snap to, pixels (> 0).
    Returns:
        Disjoint :class:`Tile` windows (core = the whole window), by row then column.
    """
    if margin < 0 or align <= 0:
        raise ValueError(f"margin must be >= 0 and align > 0, got margin={margin}, align={align}")
    h, w = shape
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    windows = np.concatenate([np.maximum((boxes[:, :2] - margin) // align * align, 0),
                              np.minimum(-(-(boxes[:, 2:] + margin) // align) * align, (w, h))], axis=1)
    # a merge can make a window overlap one it did not before: merge one pair at a time to a fixed point
    while len(overlapping := np.argwhere(np.triu(_boxes_touch(windows, windows), k=1))):
        i, j = overlapping[0]
        windows[i] = (*np.minimum(windows[i, :2], windows[j, :2]), *np.maximum(windows[i, 2:], windows[j, 2:]))
        windows = np.delete(windows, j, axis=0)
    rows_then_cols = sorted(windows.tolist(), key=lambda b: (b[1], b[0]))
    return [Tile(y0, y1, x0, x1, y0, y1, x0, x1) for x0, y0, x1, y1 in rows_then_cols]


def in_core(inst: Instances, tile: Tile) -> Instances:
    """The instances (in tile coordinates) whose centroid lies in the tile's core."""
    if len(inst) == 0:
        return inst
    cents = inst.centroids()
    rows, cols = cents[:, 0] + tile.y0, cents[:, 1] + tile.x0
    keep = (rows >= tile.core_y0) & (rows < tile.core_y1) & (cols >= tile.core_x0) & (cols < tile.core_x1)
    return inst[np.flatnonzero(keep)]


def shift_instances(inst: Instances, tile: Tile, frame_shape: tuple[int, int]) -> Instances:
    """Instances found in ``tile`` -> the same instances in frame coordinates."""
    offset = np.array([tile.x0, tile.y0, tile.x0, tile.y0], dtype=np.int32)
    return Instances(inst.boxes + offset, list(inst.crops), inst.scores, inst.sources, frame_shape)


def window_instances(inst: Instances, tile: Tile) -> Instances:
    """Instances in frame coordinates -> their parts inside ``tile``, in tile coordinates (the
    inverse of :func:`shift_instances` for instances that lie in the tile; those with no pixel in
    it are dropped). Lets instances found once on a whole frame join the work of its tiles."""

    def windows():
        for (x0, y0, x1, y1), crop in zip(inst.boxes, inst.crops):
            cx0, cy0, cx1, cy1 = max(x0, tile.x0), max(y0, tile.y0), min(x1, tile.x1), min(y1, tile.y1)
            part = crop[max(cy0 - y0, 0) : max(cy1 - y0, 0), max(cx0 - x0, 0) : max(cx1 - x0, 0)]
            yield part, cy0 - tile.y0, cx0 - tile.x0

    return Instances.from_windows(windows(), inst.scores, inst.sources, tile.shape)


def _boxes_touch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) bool: boxes (x0, y0, x1, y1), exclusive ends, that overlap."""
    return (
        (a[:, None, 0] < b[None, :, 2]) & (b[None, :, 0] < a[:, None, 2])
        & (a[:, None, 1] < b[None, :, 3]) & (b[None, :, 1] < a[:, None, 3])
    )


def _crops_intersect(inst: Instances, i: int, j: int) -> bool:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = inst.boxes[i], inst.boxes[j]
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if x0 >= x1 or y0 >= y1:
        return False
    a = inst.crops[i][y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]
    b = inst.crops[j][y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
    return bool((a & b).any())


def merge_tiled_instances(per_tile: Sequence[Instances], frame_shape: tuple[int, int]) -> Instances:
    """Join instances (already in frame coordinates) from different tiles that share a pixel.

    The merged instance's mask is the union, its score the maximum and its sources the union of
    its parts'. Instances of the same tile are never merged (the model kept them apart).
    """
    parts = [p for p in per_tile if len(p)]
    if not parts:
        return Instances.empty(frame_shape)
    boxes = np.concatenate([p.boxes for p in parts])
    crops = [c for p in parts for c in p.crops]
    scores = np.concatenate([p.scores for p in parts])
    sources = np.concatenate([p.sources for p in parts])
    tile_of = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)])
    pooled = Instances(boxes, crops, scores, sources, frame_shape)

    # union-find over pairs from different tiles whose boxes overlap and masks share a pixel
    parent = np.arange(len(pooled))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    candidates = np.argwhere(np.triu(_boxes_touch(boxes, boxes), k=1) & (tile_of[:, None] != tile_of[None, :]))
    for i, j in candidates:
        if find(i) != find(j) and _crops_intersect(pooled, i, j):
            parent[find(i)] = find(j)
    roots = np.array([find(i) for i in range(len(pooled))])

    out_boxes, out_crops, out_scores, out_sources = [], [], [], []
    for root in np.unique(roots):
        members = np.flatnonzero(roots == root)
        if len(members) == 1:
            k = members[0]
            out_boxes.append(boxes[k]); out_crops.append(crops[k])
            out_scores.append(scores[k]); out_sources.append(sources[k])
            continue
        x0, y0 = boxes[members, 0].min(), boxes[members, 1].min()
        x1, y1 = boxes[members, 2].max(), boxes[members, 3].max()
        crop = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for k in members:
            bx0, by0, bx1, by1 = boxes[k]
            crop[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0] |= crops[k]
        out_boxes.append((x0, y0, x1, y1)); out_crops.append(crop)
        out_scores.append(scores[members].max()); out_sources.append(np.bitwise_or.reduce(sources[members]))
    order = np.argsort(-np.asarray(out_scores), kind="stable")
    return Instances(np.asarray(out_boxes)[order], [out_crops[k] for k in order], np.asarray(out_scores)[order],
                     np.asarray(out_sources)[order], frame_shape)
