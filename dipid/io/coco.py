"""Per-frame instance labels and their COCO JSON form (no torch here).

A COCO file is a complete dataset description: each image's ``file_name`` is
``"<scan file>#<frame>"`` with the scan path relative to the JSON file's folder, so the scans a
label file needs are found from the file alone. Masks are stored as COCO RLE; each annotation
may carry dipid's extra keys ``frame`` and ``reflection_id`` (the 3D reflection it belongs to).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from dipid.errors import LabelError
from dipid.files import atomic_write_text

__all__ = ["FrameLabels", "LabelSet", "read_coco", "write_coco", "encode_masks"]


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool -> list of COCO RLE dicts with ``counts`` as str (JSON-ready)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def _chunked(func, rles: list[dict], size: int = 255) -> list:
    """Apply a pycocotools batch function in chunks: on NumPy 2 it overflows past 255 masks."""
    out: list = []
    for start in range(0, len(rles), size):
        out.extend(list(func(rles[start:start + size])))
    return out


@dataclass
class FrameLabels:
    """The labelled peaks of one frame.

    Attributes:
        scan: scan file path as written in ``file_name`` (relative to the label file's folder).
        frame: frame number within the scan (0-based).
        height, width: frame size in pixels.
        rles: one COCO RLE dict per instance (``counts`` as str).
        reflection_ids: (N,) int64, the 3D reflection of each instance; -1 when unknown.
    """

    scan: str
    frame: int
    height: int
    width: int
    rles: list[dict] = field(default_factory=list)
    reflection_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.reflection_ids = np.asarray(self.reflection_ids, dtype=np.int64).reshape(-1)
        if len(self.reflection_ids) != len(self.rles):
            raise ValueError("reflection_ids and rles differ in length")

    def __len__(self) -> int:
        return len(self.rles)

    @classmethod
    def from_masks(cls, scan: str, frame: int, masks: np.ndarray, reflection_ids=None) -> "FrameLabels":
        """Build from (N, H, W) bool masks."""
        masks = np.asarray(masks, dtype=bool)
        n, h, w = masks.shape
        ids = np.full(n, -1, np.int64) if reflection_ids is None else reflection_ids
        return cls(scan=scan, frame=int(frame), height=h, width=w, rles=encode_masks(masks), reflection_ids=ids)

    def masks(self) -> np.ndarray:
        """(N, H, W) bool instance masks (decoded on each call)."""
        if not self.rles:
            return np.zeros((0, self.height, self.width), bool)
        rles = [{"size": r["size"], "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"]}
                for r in self.rles]
        return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)

    def union_mask(self) -> np.ndarray:
        """(H, W) bool union of all instances."""
        return self.masks().any(axis=0) if self.rles else np.zeros((self.height, self.width), bool)

    def areas(self) -> np.ndarray:
        """(N,) pixel areas."""
        return np.asarray(_chunked(mask_utils.area, self._rles_bytes()), dtype=np.int64).reshape(-1)

    def boxes_xyxy(self) -> np.ndarray:
        """(N, 4) float32 boxes (x0, y0, x1, y1) in pixel units, x1/y1 exclusive."""
        xywh = np.asarray(_chunked(mask_utils.toBbox, self._rles_bytes()), dtype=np.float32).reshape(-1, 4)
        xywh[:, 2:] += xywh[:, :2]
        return xywh

    def _rles_bytes(self) -> list[dict]:
        return [{"size": r["size"], "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"]}
                for r in self.rles]


@dataclass
class LabelSet:
    """Labelled frames plus the folder their scan paths are relative to."""

    frames: list[FrameLabels]
    root: Path = Path(".")

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[FrameLabels]:
        return iter(self.frames)

    def __getitem__(self, i: int) -> FrameLabels:
        return self.frames[i]

    def by_scan(self) -> dict[str, list[FrameLabels]]:
        """Frames grouped by scan file name, each group sorted by frame."""
        groups: dict[str, list[FrameLabels]] = {}
        for fl in self.frames:
            groups.setdefault(fl.scan, []).append(fl)
        return {k: sorted(v, key=lambda f: f.frame) for k, v in groups.items()}

    def scan_path(self, scan: str) -> Path:
        """Absolute path of a scan named in the labels."""
        p = Path(scan)
        return p if p.is_absolute() else (self.root / p)

    @property
    def n_instances(self) -> int:
        return sum(len(f) for f in self.frames)


def write_coco(labels: Iterable[FrameLabels], path: str | Path, *, description: str = "dipid labels") -> Path:
    """Write labelled frames as one COCO JSON file (atomically). Returns the path."""
    images, annotations = [], []
    ann_id = 1
    for image_id, fl in enumerate(labels, start=1):
        images.append({"id": image_id, "file_name": f"{fl.scan}#{fl.frame}", "height": fl.height,
                       "width": fl.width, "frame": fl.frame})
        areas, boxes = fl.areas(), fl.boxes_xyxy()
        for rle, rid, area, box in zip(fl.rles, fl.reflection_ids, areas, boxes):
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]},
                "area": int(area), "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                "frame": fl.frame, "reflection_id": int(rid),
            })
            ann_id += 1
    doc = {"info": {"description": description}, "images": images, "annotations": annotations,
           "categories": [{"id": 1, "name": "peak", "supercategory": "peak"}]}
    return atomic_write_text(path, json.dumps(doc))


def _segmentation_to_rle(seg, h: int, w: int) -> dict:
    """A validated segmentation (see :func:`_segmentation_problem`) -> compressed RLE dict (``counts`` as str)."""
    if isinstance(seg, list):  # polygons
        rles = mask_utils.frPyObjects([[float(v) for v in poly] for poly in seg], h, w)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in seg["counts"]]}, h, w)
    elif isinstance(seg, dict):
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]}
    else:
        raise TypeError(type(seg).__name__)
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


# --------------------------------------------------------------------------------- validation
# read_coco checks the whole file before it returns anything, so a bad label file stops a command
# before it writes a byte (an evaluation report, a run folder) and never reaches pycocotools, which
# reads past the end of its buffers on an RLE that does not fit its size and turns a 2-point
# polygon into a box.

_SEGMENTATION_FORMS = "polygons [[x1, y1, x2, y2, x3, y3, ...], ...] or an RLE {'size': [height, width], 'counts': ...}"


def _show(value: object, limit: int = 40) -> str:
    """``repr`` of a value from the file, on one line and short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_id(value: object) -> bool:
    """COCO ids are integers; strings are accepted as long as they match across the file."""
    return _is_int(value) or isinstance(value, str)


def rle_string_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, in Python).

    Raises:
        ValueError: a character outside COCO's alphabet, a truncated number, or a negative run.
    """
    runs: list[int] = []
    pos, n = 0, len(counts)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError("the string ends inside a run length")
            c = ord(counts[pos]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[pos]!r} at position {pos} is not COCO RLE")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"run {len(runs) + 1} is negative ({value})")
        runs.append(value)
    return runs


def _polygons_problem(seg: list) -> str | None:
    if not seg:
        return f"'segmentation' is an empty list; give {_SEGMENTATION_FORMS}"
    for k, poly in enumerate(seg, start=1):
        if not isinstance(poly, list):
            return (f"segmentation polygon {k} is {_show(poly)}, not a list of coordinates; write each polygon "
                    "as [x1, y1, x2, y2, x3, y3, ...]")
        for j, v in enumerate(poly, start=1):
            if not _is_number(v) or not math.isfinite(v):
                return (f"segmentation polygon {k} coordinate {j} is {_show(v)}; coordinates must be finite "
                        "numbers (x = column, y = row, in pixels)")
        if len(poly) % 2:
            return (f"segmentation polygon {k} has {len(poly)} coordinates, an odd number; write them in "
                    "(x, y) pairs: [x1, y1, x2, y2, ...]")
        if len(poly) < 6:
            return (f"segmentation polygon {k} has {len(poly) // 2} point(s); a polygon needs at least 3 (x, y) "
                    "points: fix the polygon or delete the annotation")
    return None


def _rle_problem(seg: dict, image_id: object, h: int, w: int) -> str | None:
    size, counts = seg.get("size"), seg.get("counts")
    if size is None or counts is None:
        missing = "size" if size is None else "counts"
        return f"segmentation RLE has no '{missing}'; give {_SEGMENTATION_FORMS}"
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        return f"segmentation RLE 'size' is {_show(size)}; it must be [height, width] in pixels"
    if list(size) != [h, w]:
        return (f"segmentation RLE size {size[0]} x {size[1]} differs from image {image_id}'s height x width "
                f"{h} x {w}; encode the mask at the image's size (or correct the image's height and width)")
    if isinstance(counts, list):
        bad = next((c for c in counts if not _is_int(c) or c < 0), None)
        if bad is not None:
            return f"segmentation RLE counts hold {_show(bad)}; uncompressed counts are run lengths, integers >= 0"
        total = sum(counts)
    elif isinstance(counts, str):
        try:
            total = sum(rle_string_counts(counts))
        except ValueError as exc:
            return f"segmentation RLE counts are not a valid compressed COCO RLE string ({exc}); re-encode the mask"
    else:
        return f"segmentation RLE 'counts' is {_show(counts)}; give a list of run lengths or a compressed RLE string"
    if total != h * w:
        return (f"segmentation RLE counts add up to {total} pixels but the image is {h} x {w} = {h * w}; "
                "re-encode the mask at the image's size")
    return None


def _segmentation_problem(seg: object, image_id: object, h: int, w: int) -> str | None:
    """Why ``seg`` is not a usable segmentation of an (h, w) image, or None."""
    if isinstance(seg, list):
        return _polygons_problem(seg)
    if isinstance(seg, dict):
        return _rle_problem(seg, image_id, h, w)
    return f"'segmentation' is {_show(seg)}; give {_SEGMENTATION_FORMS}"


def _is_frame_text(text: str) -> bool:
    try:
        return int(text) >= 0
    except ValueError:
        return False


def _duplicates(ids: list) -> list[tuple[object, int]]:
    """(id, times) of every id that appears more than once, in order of first appearance."""
    return [(i, n) for i, n in Counter(ids).items() if n > 1]


def _validate(doc: object, path: Path) -> None:
    """Raise :class:`LabelError` naming the first problem of a COCO document (and how many more there are)."""
    if not isinstance(doc, dict):
        raise LabelError(f"{path}: the JSON is a {type(doc).__name__}, not an object; expected COCO JSON with "
                         "'images' and 'annotations' lists")
    for key in ("images", "annotations"):
        if key not in doc:
            raise LabelError(f"{path}: no '{key}' list; expected COCO JSON with images and annotations")
        if not isinstance(doc[key], list):
            raise LabelError(f"{path}: '{key}' is a {type(doc[key]).__name__}, not a list; expected COCO JSON")
    problems: list[str] = []

    # images: ids, sizes, frames
    sizes: dict = {}
    for index, img in enumerate(doc["images"]):
        if not isinstance(img, dict):
            problems.append(f"images[{index}] is {_show(img)}, not an object; give each image an id, file_name, "
                            "height and width")
            continue
        image_id = img.get("id")
        where = f"image {image_id}" if _is_id(image_id) else f"images[{index}]"
        if not _is_id(image_id):
            problems.append(f"{where} has {'no' if image_id is None else 'a non-integer'} 'id'; give each image a "
                            "unique integer id")
        bad_size = [k for k in ("height", "width") if not (_is_int(img.get(k)) and img[k] > 0)]
        for key in bad_size:
            problems.append(f"{where} has {'no' if key not in img else 'a bad'} '{key}'"
                            f"{'' if key not in img else f' ({_show(img[key])})'}; give each image its height and "
                            "width in pixels (positive integers)")
        name = img.get("file_name")
        if not isinstance(name, str) or not name or name.startswith("#"):
            problems.append(f"{where} has {'no' if name is None else 'a bad'} 'file_name'"
                            f"{'' if name is None else f' ({_show(name)})'}; write '<scan file>#<frame>', the scan "
                            "relative to this file's folder")
        elif "#" in name and not _is_frame_text(name.rpartition("#")[2]):
            problems.append(f"{where} file_name {_show(name)} does not end in '#<frame>' (a frame number)")
        elif "#" not in name and "frame" in img and not _is_int(img["frame"]):
            problems.append(f"{where} has 'frame' {_show(img['frame'])}; it must be the frame number, an integer")
        if _is_id(image_id) and not bad_size:
            sizes.setdefault(image_id, (img["height"], img["width"]))
    image_id_list = [img.get("id") for img in doc["images"] if isinstance(img, dict) and _is_id(img.get("id"))]
    image_ids = set(image_id_list)
    for dup, times in _duplicates(image_id_list):
        problems.append(f"image id {_show(dup)} appears {times} times in 'images'; give every "
                        "image its own id")

    # categories (optional in dipid, which has one class; when given, annotations must use them)
    categories = doc.get("categories")
    category_ids: set | None = None
    if categories is not None:
        if not isinstance(categories, list) or not all(isinstance(c, dict) and _is_id(c.get("id")) for c in categories):
            problems.append("'categories' must be a list of objects with an integer 'id' (dipid's is "
                            "[{'id': 1, 'name': 'peak'}])")
        else:
            category_ids = {c["id"] for c in categories}

    # annotations
    for index, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            problems.append(f"annotations[{index}] is {_show(ann)}, not an object; give each annotation an id, "
                            "image_id, category_id and segmentation")
            continue
        ann_id = ann.get("id")
        if not _is_id(ann_id):
            where = f"annotation at annotations[{index}]"
            problems.append(f"{where} has {'no' if ann_id is None else 'a non-integer'} 'id'; give each "
                            "annotation a unique integer id")
        else:
            where = f"annotation {ann_id}"
        image_id = ann.get("image_id")
        if "image_id" not in ann:
            problems.append(f"{where} has no 'image_id'; give the id of the image it belongs to")
        elif not _is_id(image_id) or image_id not in image_ids:
            problems.append(f"{where}: image_id {_show(image_id)} is not the id of any image in 'images'; fix the "
                            "image_id or add the image")
        if category_ids is not None:
            cat = ann.get("category_id")
            if "category_id" not in ann:
                problems.append(f"{where} has no 'category_id'; use one of the categories' ids "
                                f"({', '.join(map(str, sorted(category_ids, key=str)))})")
            elif not _is_id(cat) or cat not in category_ids:
                problems.append(f"{where}: category_id {_show(cat)} is not among the categories' ids "
                                f"({', '.join(map(str, sorted(category_ids, key=str))) or 'none given'}); use one of "
                                "them or add the category")
        if "reflection_id" in ann and ann["reflection_id"] is not None and not _is_int(ann["reflection_id"]):
            problems.append(f"{where}: reflection_id {_show(ann['reflection_id'])} is not an integer (-1 when unknown)")
        if "segmentation" not in ann:
            problems.append(f"{where} has no 'segmentation'; give {_SEGMENTATION_FORMS}")
        elif _is_id(image_id) and image_id in sizes:
            problem = _segmentation_problem(ann["segmentation"], image_id, *sizes[image_id])
            if problem:
                problems.append(f"{where} (image {image_id}): {problem}")
    ann_ids = [a.get("id") for a in doc["annotations"] if isinstance(a, dict) and _is_id(a.get("id"))]
    for dup, times in _duplicates(ann_ids):
        problems.append(f"annotation id {_show(dup)} appears {times} times in 'annotations'; give "
                        "every annotation its own id")

    if problems:
        more = f" ({len(problems) - 1} more problem{'s' if len(problems) > 2 else ''} in this file)" if len(problems) > 1 else ""
        raise LabelError(f"{path}: {problems[0]}{more}")


def read_coco(path: str | Path) -> LabelSet:
    """Read a COCO JSON label file (RLE or polygon masks) into a :class:`LabelSet`.

    The whole file is checked before anything is returned: every image needs a unique id and its
    height and width; every annotation a unique id, the id of one of the images, one of the
    categories' ids (when the file lists categories) and a segmentation that fits its image:
    polygons of at least 3 (x, y) points with finite coordinates, or an RLE whose size is the
    image's height and width and whose counts add up to height x width.

    Raises:
        LabelError: missing file, not JSON, or the first problem found (the message names the
            file, the image or annotation id and what to fix, and says how many more problems
            there are).
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: label file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path}: not a JSON file ({exc}); expected COCO JSON") from exc
    _validate(doc, path)
    by_image: dict = {}
    for ann in doc["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    frames = []
    for img in doc["images"]:
        name = img["file_name"]
        if "#" in name:
            scan, _, frame_text = name.rpartition("#")
            frame = int(frame_text)
        else:
            scan, frame = name, int(img.get("frame", 0))
        h, w = int(img["height"]), int(img["width"])
        anns = by_image.get(img["id"], [])
        rles = [_segmentation_to_rle(a["segmentation"], h, w) for a in anns]
        ids = [-1 if a.get("reflection_id") is None else int(a["reflection_id"]) for a in anns]
        frames.append(FrameLabels(scan=scan, frame=frame, height=h, width=w, rles=rles, reflection_ids=ids))
    return LabelSet(frames=frames, root=path.parent)
