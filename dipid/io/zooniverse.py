"""Zooniverse classification exports -> dipid instance labels (no torch here).

The original DiPID models were trained on peaks that volunteers outlined on log-scaled PNGs of
I16 Pilatus frames in a Zooniverse project. The export is a CSV with one row per classification
(one volunteer's answer for one image); the columns dipid reads are:

* ``classification_id``, ``subject_ids``;
* ``subject_data``: JSON ``{"<subject id>": {..., "Image Number": "<scan>-<frame>"}}``;
* ``annotations``: JSON list of tasks: ``T1`` "How many peaks are in this image?" (an answer such
  as ``"2"`` or ``"more than 3"``) and ``T3`` polygons, each ``{"points": [{"x": col, "y": row},
  ...]}`` with ``x`` along the 487 columns and ``y`` along the 195 rows, in pixel-edge units (the
  pixel in column ``c`` spans ``c <= x < c + 1``). Answers of "0 peaks" have no ``T3``.
* ``user_name`` (or ``user_id``) when the export has it; the I16 export has neither.

Polygons are rasterised by pycocotools (C code, the COCO polygon convention: a pixel is inside
when its centre is) and clipped to the frame. Several volunteers' answers for one image are merged
into one consensus label set by :func:`consensus_instances` (the rule is in its docstring).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from dipid.errors import LabelError, UnknownNameError
from dipid.io.coco import FrameLabels, LabelSet, write_coco

__all__ = [
    "ZooniverseClassification",
    "read_zooniverse",
    "rasterize_polygons",
    "mask_iou",
    "consensus_instances",
    "zooniverse_to_labels",
    "convert_zooniverse",
    "CONSENSUS_RULES",
    "PILATUS_100K_SHAPE",
]

logger = logging.getLogger(__name__)

#: (rows, columns) of a Pilatus 100K frame, the size the I16 volunteers drew on.
PILATUS_100K_SHAPE = (195, 487)

#: Ways of turning several volunteers' answers into one label set (see :func:`zooniverse_to_labels`).
CONSENSUS_RULES = ("majority", "none")

_REQUIRED_COLUMNS = ("classification_id", "subject_ids", "subject_data", "annotations")
_FIX = "re-export the classifications from the Zooniverse project builder, or fix the row by hand"


@dataclass
class ZooniverseClassification:
    """One volunteer's answer for one image.

    Attributes:
        classification_id: Zooniverse's id of this classification.
        user: the volunteer's ``user_name`` (or ``user_id``) when the export has the column, else None.
        subject_id: Zooniverse's id of the image.
        scan: scan number as written before the last ``-`` of the ``Image Number`` (e.g. ``"794673"``).
        frame: frame number as written after it (the I16 export numbers frames from 0, as dipid does).
        n_peaks_answer: the answer to the "how many peaks" task as written (``"0"`` ... ``"3"``,
            ``"more than 3"``), None when the task is absent.
        polygons: one (K, 2) float64 array of vertices per outlined peak, columns (x = column, y = row)
            in pixel-edge units; may run past the frame edge.
    """

    classification_id: int
    user: str | None
    subject_id: int
    scan: str
    frame: int
    n_peaks_answer: str | None
    polygons: list[np.ndarray] = field(default_factory=list)

    @property
    def image_key(self) -> tuple[str, int]:
        """(scan, frame): the image this classification is about."""
        return (self.scan, self.frame)


def _row_error(path: Path, row: int, column: str, problem: str) -> LabelError:
    return LabelError(f"{path}: row {row}, column '{column}': {problem}; {_FIX}")


def _parse_image_number(text: object, path: Path, row: int) -> tuple[str, int]:
    scan, sep, frame_text = str(text).strip().rpartition("-")
    try:
        frame = int(frame_text)
    except ValueError:
        frame = -1
    if not sep or not scan or frame < 0:
        raise _row_error(path, row, "subject_data",
                         f"'Image Number' is {text!r}, expected '<scan>-<frame>' such as '794673-14'")
    return scan, frame


def _parse_subject(text: str, subject_id: int, path: Path, row: int) -> tuple[str, int]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _row_error(path, row, "subject_data", f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise _row_error(path, row, "subject_data", "expected a JSON object keyed by subject id")
    entry = data.get(str(subject_id))
    if entry is None and len(data) == 1:
        entry = next(iter(data.values()))
    if not isinstance(entry, dict) or "Image Number" not in entry:
        raise _row_error(path, row, "subject_data",
                         f"no 'Image Number' for subject {subject_id} (expected '<scan>-<frame>')")
    return _parse_image_number(entry["Image Number"], path, row)


def _parse_polygon(shape: object, path: Path, row: int, task: str) -> np.ndarray:
    points = shape.get("points") if isinstance(shape, dict) else None
    if not isinstance(points, list):
        raise _row_error(path, row, "annotations", f"a {task} shape has no 'points' list")
    try:
        vertices = np.array([[float(p["x"]), float(p["y"])] for p in points], dtype=np.float64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError) as exc:
        raise _row_error(path, row, "annotations", f"a {task} point is not {{'x': number, 'y': number}} ({exc})") from exc
    if not np.isfinite(vertices).all():
        raise _row_error(path, row, "annotations", f"a {task} polygon has a non-finite coordinate")
    return vertices


def _parse_annotations(text: str, path: Path, row: int, count_task: str,
                       polygon_task: str) -> tuple[str | None, list[np.ndarray]]:
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _row_error(path, row, "annotations", f"not valid JSON ({exc})") from exc
    if not isinstance(tasks, list):
        raise _row_error(path, row, "annotations", "expected a JSON list of tasks")
    answer: str | None = None
    polygons: list[np.ndarray] = []
    for task in tasks:
        if not isinstance(task, dict) or "task" not in task:
            raise _row_error(path, row, "annotations", "a task entry has no 'task' key")
        if task["task"] == count_task:
            value = task.get("value")
            answer = None if value is None else str(value)
        elif task["task"] == polygon_task:
            shapes = task.get("value") or []
            if not isinstance(shapes, list):
                raise _row_error(path, row, "annotations", f"{polygon_task} 'value' is not a list of shapes")
            for shape in shapes:
                vertices = _parse_polygon(shape, path, row, polygon_task)
                if len(vertices) < 3:
                    # A two-click "polygon" encloses nothing; it is a slip, not a malformed file.
                    logger.warning("%s: row %d: dropping a %s polygon with %d vertices", path, row,
                                   polygon_task, len(vertices))
                    continue
                polygons.append(vertices)
    return answer, polygons


def read_zooniverse(csv_path: str | Path, *, count_task: str = "T1",
                    polygon_task: str = "T3") -> list[ZooniverseClassification]:
    """Read every classification of a Zooniverse export CSV, in file order.

    Args:
        csv_path: the export (``*-classifications.csv``).
        count_task, polygon_task: task ids of the "how many peaks" question and the polygon tool.
    Returns:
        one :class:`ZooniverseClassification` per row.
    Raises:
        LabelError: missing file, missing column, or a malformed row; the message names the file,
            the row (the header is row 1, as in a spreadsheet) and the column.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise LabelError(f"{path}: Zooniverse export not found; pass the classifications CSV")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise LabelError(f"{path}: row 1 (header): no column {', '.join(repr(c) for c in missing)}; "
                                 f"expected a Zooniverse classification export with columns "
                                 f"{', '.join(_REQUIRED_COLUMNS)}")
            user_column = next((c for c in ("user_name", "user_id") if c in columns), None)
            out = []
            for row_number, row in enumerate(reader, start=2):
                out.append(_parse_row(row, row_number, path, user_column, count_task, polygon_task))
    except UnicodeDecodeError as exc:
        raise LabelError(f"{path}: not a UTF-8 text CSV ({exc}); expected a Zooniverse export") from exc
    except csv.Error as exc:
        raise LabelError(f"{path}: not a readable CSV ({exc}); expected a Zooniverse export") from exc
    logger.info("%s: read %d classifications with %d polygons", path, len(out),
                sum(len(c.polygons) for c in out))
    return out


def _parse_row(row: dict, row_number: int, path: Path, user_column: str | None, count_task: str,
               polygon_task: str) -> ZooniverseClassification:
    ids = {}
    for column in ("classification_id", "subject_ids"):
        value = row.get(column)
        try:
            ids[column] = int(str(value).strip())
        except ValueError as exc:
            raise _row_error(path, row_number, column, f"{value!r} is not an integer id") from exc
    for column in ("subject_data", "annotations"):
        if row.get(column) is None:  # csv gives None for the columns of a short row
            raise _row_error(path, row_number, column, "the row ends before this column")
    scan, frame = _parse_subject(row["subject_data"], ids["subject_ids"], path, row_number)
    answer, polygons = _parse_annotations(row["annotations"], path, row_number, count_task, polygon_task)
    user = row.get(user_column) if user_column else None
    return ZooniverseClassification(classification_id=ids["classification_id"], user=user or None,
                                    subject_id=ids["subject_ids"], scan=scan, frame=frame,
                                    n_peaks_answer=answer, polygons=polygons)


def rasterize_polygons(polygons: Sequence[np.ndarray], frame_shape: tuple[int, int] = PILATUS_100K_SHAPE) -> np.ndarray:
    """Fill polygons on a frame, clipped to it.

    Args:
        polygons: (K, 2) vertex arrays (x = column, y = row), pixel-edge units, K >= 3.
        frame_shape: (H, W) in pixels.
    Returns:
        (N, H, W) bool; pixel (r, c) is set when its centre (c + 0.5, r + 0.5) is inside polygon n
        (pycocotools' C rasteriser, which places vertices on a 0.2 px grid). Parts beyond the frame
        are cut off; a polygon entirely outside gives an empty mask.
    Raises:
        ValueError: a polygon with fewer than 3 vertices or reaching over ``_MAX_CANVAS_PIXELS``.
    """
    h, w = (int(s) for s in frame_shape)
    out = np.zeros((len(polygons), h, w), bool)
    within: list[int] = []
    for n, poly in enumerate(polygons):
        vertices = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(vertices) < 3:
            raise ValueError(f"polygon {n} has {len(vertices)} vertices; at least 3 are needed")
        if vertices.min() >= 0 and (vertices <= [w, h]).all():
            within.append(n)
        else:
            out[n] = _rasterize_clipped(vertices, h, w)
    if within:  # the common case: one C call for all polygons inside the frame
        flat = [np.asarray(polygons[n], dtype=np.float64).reshape(-1).tolist() for n in within]
        out[within] = mask_utils.decode(mask_utils.frPyObjects(flat, h, w)).transpose(2, 0, 1).astype(bool)
    return out


#: Largest canvas (pixels) a polygon running past the frame may need; more means nonsense coordinates.
_MAX_CANVAS_PIXELS = 64_000_000


def _rasterize_clipped(vertices: np.ndarray, h: int, w: int) -> np.ndarray:
    """One polygon -> (h, w) bool, exact clipping.

    pycocotools rounds vertices with a C cast that truncates toward zero, so negative coordinates
    land on a different sub-pixel grid than positive ones and edge pixels come out wrong. Polygons
    running past the frame are therefore shifted by a whole number of pixels onto a canvas holding
    all their vertices at non-negative coordinates, filled there, and cropped back.
    """
    x0 = min(0, math.floor(vertices[:, 0].min()))
    y0 = min(0, math.floor(vertices[:, 1].min()))
    x1 = max(w, math.ceil(vertices[:, 0].max()) + 1)
    y1 = max(h, math.ceil(vertices[:, 1].max()) + 1)
    if (x1 - x0) * (y1 - y0) > _MAX_CANVAS_PIXELS:
        raise ValueError(f"polygon reaches x {vertices[:, 0].min():g}..{vertices[:, 0].max():g}, "
                         f"y {vertices[:, 1].min():g}..{vertices[:, 1].max():g}, far outside a {h}x{w} frame")
    shifted = (vertices - [x0, y0]).reshape(-1).tolist()
    rle = mask_utils.frPyObjects([shifted], y1 - y0, x1 - x0)
    canvas = mask_utils.decode(rle)[:, :, 0]
    return canvas[-y0:-y0 + h, -x0:-x0 + w].astype(bool)


def mask_iou(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, N) float64 intersection over union (0 where both masks are empty)."""
    flat = np.asarray(masks, dtype=bool).reshape(len(masks), -1).astype(np.float32)
    inter = flat @ flat.T
    area = np.diag(inter)
    union = area[:, None] + area[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0).astype(np.float64)


def consensus_instances(volunteer_masks: Sequence[np.ndarray], *, iou_threshold: float = 0.3) -> np.ndarray:
    """Merge several volunteers' instance masks of one image into consensus instances.

    The rule ("majority"), for an image labelled by n volunteers (a "0 peaks" answer, or polygons
    that cover no pixel, count as a volunteer who drew nothing):

    1. Instances of different volunteers are clustered greedily: pairs with mask IoU
       >= ``iou_threshold`` are taken in order of decreasing IoU, and the pair's clusters are merged
       unless that would put two instances of one volunteer in a cluster (each volunteer
       contributes at most one outline per peak).
    2. A cluster becomes a consensus instance when it holds the outlines of at least ceil(n / 2)
       volunteers (so with two volunteers a peak drawn by either one is kept).
    3. Its mask is the pixels marked by at least ceil(m / 2) of its m outlines (with one or two
       outlines that is their union); if that is empty the union is used.

    With one volunteer the result is that volunteer's instances. Instances are ordered by their
    first outline (volunteer order, then drawing order).

    Args:
        volunteer_masks: one (N_v, H, W) bool array per volunteer (N_v may be 0).
        iou_threshold: the IoU at which two outlines count as the same peak.
    Returns:
        (N, H, W) bool consensus masks.
    """
    if len(volunteer_masks) == 0:
        raise ValueError("consensus_instances needs at least one volunteer")
    shape = np.asarray(volunteer_masks[0]).shape[1:]
    masks = [np.asarray(m, dtype=bool).reshape(-1, *shape) for m in volunteer_masks]
    owner = np.concatenate([np.full(len(m), v) for v, m in enumerate(masks)]).astype(int)
    stacked = np.concatenate(masks, axis=0)
    if len(masks) == 1 or len(stacked) == 0:
        return stacked
    n_volunteers = len(masks)
    iou = mask_iou(stacked)
    parent = list(range(len(stacked)))
    members: dict[int, set[int]] = {i: {int(owner[i])} for i in range(len(stacked))}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = [(iou[i, j], i, j) for i in range(len(stacked)) for j in range(i + 1, len(stacked))
             if owner[i] != owner[j] and iou[i, j] >= iou_threshold]
    for _, i, j in sorted(pairs, key=lambda t: (-t[0], t[1], t[2])):
        ri, rj = root(i), root(j)
        if ri != rj and not (members[ri] & members[rj]):
            keep, drop = min(ri, rj), max(ri, rj)
            parent[drop] = keep
            members[keep] |= members.pop(drop)
    clusters: dict[int, list[int]] = {}
    for i in range(len(stacked)):
        clusters.setdefault(root(i), []).append(i)
    needed = math.ceil(n_volunteers / 2)
    out = []
    for first in sorted(clusters):
        outline_ids = clusters[first]
        if len(outline_ids) < needed:
            continue
        votes = stacked[outline_ids].sum(axis=0)
        mask = votes >= math.ceil(len(outline_ids) / 2)
        out.append(mask if mask.any() else votes > 0)
    return np.stack(out) if out else np.zeros((0, *shape), bool)


def zooniverse_to_labels(csv_path: str | Path, *, consensus: str = "majority",
                         frame_shape: tuple[int, int] = PILATUS_100K_SHAPE, scan_suffix: str = ".nxs",
                         iou_threshold: float = 0.3) -> LabelSet:
    """Turn a Zooniverse export into one :class:`~dipid.io.coco.FrameLabels` per image.

    Args:
        csv_path: the export CSV (see :func:`read_zooniverse`).
        consensus: ``"majority"`` merges volunteers by :func:`consensus_instances`; ``"none"`` keeps
            every volunteer's outlines as separate (overlapping) instances.
        frame_shape: (H, W) the volunteers drew on; polygons are clipped to it.
        scan_suffix: appended to the scan number to name the scan file (``"794673"`` -> ``"794673.nxs"``).
        iou_threshold: IoU at which two volunteers' outlines are the same peak.
    Returns:
        a LabelSet rooted at the CSV's folder with every image (also those with no peaks), sorted
        by scan then frame; frame numbers are taken as written in the ``Image Number`` (0-based in
        the I16 export); reflection ids are -1 (unknown). Outlines that cover no pixel are dropped.
    Raises:
        LabelError: unreadable export (see :func:`read_zooniverse`).
        UnknownNameError: unknown ``consensus``.
    """
    if consensus not in CONSENSUS_RULES:
        raise UnknownNameError("consensus rule", consensus, CONSENSUS_RULES)
    path = Path(csv_path)
    classifications = read_zooniverse(path)
    by_image: dict[tuple[str, int], list[ZooniverseClassification]] = {}
    for c in classifications:
        by_image.setdefault(c.image_key, []).append(c)
    frames = []
    n_dropped = 0
    for (scan, frame) in sorted(by_image, key=lambda k: (k[0], k[1])):
        volunteer_masks = []
        for c in by_image[(scan, frame)]:
            try:
                masks = rasterize_polygons(c.polygons, frame_shape)
            except ValueError as exc:
                raise LabelError(f"{path}: classification {c.classification_id}, column 'annotations': {exc}; "
                                 f"{_FIX}") from exc
            nonempty = masks.any(axis=(1, 2))
            n_dropped += int((~nonempty).sum())
            volunteer_masks.append(masks[nonempty])
        if consensus == "majority":
            instances = consensus_instances(volunteer_masks, iou_threshold=iou_threshold)
        else:
            instances = np.concatenate(volunteer_masks, axis=0)
        frames.append(FrameLabels.from_masks(f"{scan}{scan_suffix}", frame, instances))
    if n_dropped:
        logger.warning("%s: dropped %d polygons that cover no pixel of the %dx%d frame", path, n_dropped,
                       *frame_shape)
    labels = LabelSet(frames=frames, root=path.parent)
    logger.info("%s: %d images, %d instances after %s consensus", path, len(labels), labels.n_instances, consensus)
    return labels


def convert_zooniverse(csv_path: str | Path, out_json: str | Path, **kwargs) -> LabelSet:
    """Convert a Zooniverse export to a COCO JSON label file (written atomically).

    Keyword arguments are those of :func:`zooniverse_to_labels`. The scan file names in the JSON
    (``"<scan><scan_suffix>"``) are relative to ``out_json``'s folder, so put the scans there.

    Returns:
        the labels, rooted at ``out_json``'s folder (as :func:`dipid.io.coco.read_coco` would give).
    """
    labels = zooniverse_to_labels(csv_path, **kwargs)
    out = write_coco(labels, out_json, description=f"dipid labels from Zooniverse export {Path(csv_path).name}")
    return LabelSet(frames=labels.frames, root=Path(out).parent)
