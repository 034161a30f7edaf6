"""Per-frame instance labels and their COCO JSON form (no torch here).

A COCO file is a complete dataset description: each image's ``file_name`` is
``"<scan file>#<frame>"`` with the scan path relative to the JSON file's folder, so the scans a
label file needs are found from the file alone. Masks are stored as COCO RLE; each annotation
may carry dipid's extra keys ``frame`` and ``reflection_id`` (the 3D reflection it belongs to).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from dipid.errors import LabelError

__all__ = ["FrameLabels", "LabelSet", "read_coco", "write_coco", "encode_masks", "atomic_write_text"]


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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    if isinstance(seg, list):  # polygons
        rles = mask_utils.frPyObjects(seg, h, w)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(seg, dict):
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]}
    else:
        raise TypeError(type(seg).__name__)
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def read_coco(path: str | Path) -> LabelSet:
    """Read a COCO JSON label file (RLE or polygon masks) into a :class:`LabelSet`.

    Raises:
        LabelError: missing file, not JSON, or a required key absent (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: label file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path}: not a JSON file ({exc}); expected COCO JSON") from exc
    for key in ("images", "annotations"):
        if key not in doc:
            raise LabelError(f"{path}: no '{key}' list; expected COCO JSON with images and annotations")
    by_image: dict[int, list[dict]] = {}
    for ann in doc["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    frames = []
    for img in doc["images"]:
        name = str(img.get("file_name", ""))
        if "#" in name:
            scan, _, frame_text = name.rpartition("#")
            try:
                frame = int(frame_text)
            except ValueError as exc:
                raise LabelError(f"{path}: image {img.get('id')} file_name {name!r} does not end in '#<frame>'") from exc
        else:
            scan, frame = name, int(img.get("frame", 0))
        h, w = int(img["height"]), int(img["width"])
        anns = by_image.get(img["id"], [])
        try:
            rles = [_segmentation_to_rle(a["segmentation"], h, w) for a in anns]
        except (KeyError, TypeError) as exc:
            raise LabelError(f"{path}: image {img.get('id')} has an annotation without a usable 'segmentation'") from exc
        ids = [int(a.get("reflection_id", -1)) for a in anns]
        frames.append(FrameLabels(scan=scan, frame=frame, height=h, width=w, rles=rles, reflection_ids=ids))
    return LabelSet(frames=frames, root=path.parent)
