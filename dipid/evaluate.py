"""Evaluate models on labelled frames: DiPID's IoU, instance P/R/F1, COCO mask AP, hit finding.

One prediction pass serves every model the predictor holds (tlm, ssl, joint, classical); the
metrics are the pure functions of :mod:`dipid.metrics`, and frames per second come from the
predictor's own per-stage timings (reading excluded).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dipid.errors import LabelError, UnknownNameError
from dipid.files import atomic_write_text, to_jsonable
from dipid.io import open_scan
from dipid.io.coco import LabelSet, read_coco
from dipid.metrics import evaluate_frames, mask_iou_matrix
from dipid.results import MODEL_KINDS, Instances
from dipid.tables import text_table

logger = logging.getLogger(__name__)

__all__ = [
    "EvaluationReport",
    "evaluate",
    "iter_labelled_batches",
    "load_label_sets",
    "merge_views",
    "model_seconds",
]

#: Stages whose time each model's frames/s is made of (see ImageResult.timings).
_MODEL_STAGES = {
    "tlm": ("normalize", "tlm"),
    "ssl": ("normalize", "ssl"),
    "joint": ("normalize", "tlm", "ssl", "joint_classical", "fuse"),
    "classical": ("classical",),
}
SUMMARY_COLUMNS = ("mean_iou", "precision", "recall", "f1", "AP", "AP50", "hit_auc", "fp_area_per_empty_frame", "frames_per_s")


def model_seconds(timings: dict[str, float], model: str) -> float:
    """Seconds one model spent on a frame, from an ImageResult's stage timings."""
    return float(sum(timings.get(stage, 0.0) for stage in _MODEL_STAGES[model]))


def load_label_sets(spec: str | Path | Sequence[str | Path]) -> list[LabelSet]:
    """COCO label files named by ``spec``: a JSON file, a folder of ``*_labels.json``/``*.json``, or a list."""
    if isinstance(spec, (list, tuple)):
        return [ls for item in spec for ls in load_label_sets(item)]
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*_labels.json")) or sorted(path.glob("*.json"))
        if not files:
            raise LabelError(f"{path}: no COCO label files (*_labels.json or *.json) in this folder")
        return [read_coco(f) for f in files]
    return [read_coco(path)]


def iter_labelled_batches(
    label_sets: Sequence[LabelSet], batch_size: int = 8
) -> Iterator[tuple[str, list[Any], np.ndarray, np.ndarray]]:
    """Every labelled frame, read in batches from its scan (opened once per scan).

    Yields:
        ``(scan name, frame labels (B), counts (B, H, W) float32 filled, bad pixels (B, H, W) bool)``.
    """

    for labels in label_sets:
        for scan_name, frame_labels in labels.by_scan().items():
            with open_scan(labels.scan_path(scan_name)) as scan:
                for start in range(0, len(frame_labels), batch_size):
                    chunk = frame_labels[start:start + batch_size]
                    counts, bad = scan.read_frames([fl.frame for fl in chunk])
                    yield scan_name, chunk, counts, bad


def merge_views(views: Sequence[Instances], *, iou_threshold: float = 0.5, min_votes: int | None = None) -> Instances:
    """Merge the instance sets of several test-time-augmented views of one frame.

    Rule: instances from all views are clustered greedily (highest score first) by mask IoU >=
    ``iou_threshold``; a cluster is kept when it was found in at least ``min_votes`` views
    (default: half of them, rounded up); its mask is the pixels covered by at least half of its
    members, its score the sum of its members' scores divided by the number of views (a view
    that missed the peak counts as score 0).
    """

    shape = views[0].shape
    n_views = len(views)
    min_votes = math.ceil(n_views / 2) if min_votes is None else min_votes
    masks = np.concatenate([v.masks for v in views]) if n_views else np.zeros((0, *shape), bool)
    scores = np.concatenate([v.scores for v in views]) if n_views else np.zeros(0, np.float32)
    view_of = np.concatenate([np.full(len(v), k) for k, v in enumerate(views)]) if n_views else np.zeros(0, int)
    if len(masks) == 0:
        return Instances.empty(shape)
    iou = mask_iou_matrix(masks, masks)
    unassigned = np.ones(len(masks), bool)
    out_masks, out_scores = [], []
    for i in np.argsort(-scores, kind="stable"):
        if not unassigned[i]:
            continue
        members = np.flatnonzero(unassigned & (iou[i] >= iou_threshold))
        # at most one member per view: the best-overlapping one
        chosen = []
        for k in np.unique(view_of[members]):
            in_view = members[view_of[members] == k]
            chosen.append(in_view[np.argmax(iou[i, in_view])])
        chosen = np.asarray(chosen)
        unassigned[chosen] = False
        if len(chosen) < min_votes:
            continue
        votes = masks[chosen].sum(axis=0)
        mask = votes * 2 >= len(chosen)
        out_masks.append(mask if mask.any() else masks[chosen].any(axis=0))
        out_scores.append(float(scores[chosen].sum() / n_views))
    if not out_masks:
        return Instances.empty(shape)
    return Instances.from_masks(np.stack(out_masks), np.asarray(out_scores, np.float32), np.bitwise_or.reduce(
        np.concatenate([v.sources for v in views])) if sum(len(v) for v in views) else 0)


@dataclass
class EvaluationReport:
    """Metrics of each model, overall and per scan.

    Attributes:
        summary: model -> metric -> value (see :func:`dipid.metrics.evaluate_frames`, plus AP and frames_per_s).
        per_scan: model -> scan -> metric -> value.
        settings: what was evaluated and how (data, tta, thresholds).
        per_group: model -> group -> metric -> value, COCO AP included, when :func:`evaluate` was
            given ``group_of`` (e.g. the simulator preset of each scan); empty otherwise.
    """

    summary: dict[str, dict[str, float]]
    per_scan: dict[str, dict[str, dict[str, float]]]
    settings: dict[str, Any] = field(default_factory=dict)
    per_group: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "per_scan": self.per_scan, "settings": self.settings,
                "per_group": self.per_group}

    def to_json(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(to_jsonable(self.to_dict()), indent=2))

    def format_table(self, columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
        """The summary and the per-scan breakdown as fixed-width text tables."""
        lines = [text_table(["model", *columns], [[m, *(self.summary[m].get(c, float("nan")) for c in columns)]
                                              for m in self.summary])]
        scan_cols = ("n_frames", "mean_iou", "precision", "recall", "f1", "hit_auc")
        rows = [[m, Path(s).name, *(v.get(c, float("nan")) for c in scan_cols)]
                for m, scans in self.per_scan.items() for s, v in scans.items()]
        lines.append(text_table(["model", "scan", *scan_cols], rows))
        return "\n\n".join(lines)


def evaluate(
    predictor,
    data: str | Path | Sequence[str | Path] | LabelSet | Sequence[LabelSet],
    *,
    models: Sequence[str] | None = None,
    tta: bool = False,
    batch_size: int = 8,
    coco_ap: bool = True,
    progress: bool = True,
    group_of: Callable[[str], str] | None = None,
) -> EvaluationReport:
    """Run ``predictor`` over every labelled frame of ``data`` and score each model.

    Args:
        predictor: a :class:`dipid.predict.JointPredictor`.
        data: COCO file(s), a folder of them, or LabelSet(s).
        models: subset of tlm/ssl/joint/classical (default: all the predictor can run). With
            tlm or ssl among them the networks run on every frame for their rows (a
            ``classical_gate`` setting is switched off for them; `joint` is the same with it or
            without). `joint` is scored as ``predictor`` runs it: with ``peak_windows`` set, which
            can change it, it gets a pass of its own.
        tta: also predict the flipped and rotated views and merge them (:func:`merge_views`).
        group_of: scan name -> group name; each group is also scored on its own (``per_group``),
            from the same predictions.
    """

    label_sets = [data] if isinstance(data, LabelSet) else (
        list(data) if isinstance(data, (list, tuple)) and data and isinstance(data[0], LabelSet) else load_label_sets(data))
    models = tuple(models) if models is not None else predictor.available_models
    for m in models:
        if m not in MODEL_KINDS or m not in predictor.available_models:
            raise UnknownNameError("model", m, predictor.available_models)
    # (predictor, models it scores): the networks' own rows need them run on whole frames, all of
    # them; `joint` is the same with the gate or without, but the peak windows can change it.
    passes = [(predictor, models)]
    if getattr(predictor.settings, "classical_gate", False) and {"tlm", "ssl"} & set(models):
        whole_frames = predictor.with_settings(classical_gate=False, peak_windows=None)
        if predictor.settings.peak_windows is not None and "joint" in models:
            passes = [(whole_frames, tuple(m for m in models if m != "joint")), (predictor, ("joint",))]
        else:
            passes = [(whole_frames, models)]
    views = _tta_views() if tta else [(lambda a: a, lambda a: a)]

    gt: list[np.ndarray] = []
    valid: list[np.ndarray] = []
    scan_of: list[str] = []
    preds: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in models}
    seconds: dict[str, float] = {m: 0.0 for m in models}
    total = sum(len(ls) for ls in label_sets)
    with tqdm(total=total, desc="evaluate", unit="frame", disable=not progress) as bar:
        for scan_name, chunk, counts, bad in iter_labelled_batches(label_sets, batch_size):
            per_view: dict[str, list] = {m: [] for m in models}  # model -> per view, per frame (result, inverse)
            for forward, inverse in views:
                view_counts, view_bad = np.ascontiguousarray(forward(counts)), forward(bad)
                for runner, scored in passes:
                    results = runner.predict_frames(view_counts, bad_pixels=view_bad, models=scored,
                                                    keep_probability=False)
                    for m in scored:
                        per_view[m].append([(r, inverse) for r in results])
            for k, fl in enumerate(chunk):
                gt.append(fl.masks())
                valid.append(~bad[k])
                scan_of.append(scan_name)
                for m in models:
                    view_sets = [_unview(r.instances(m), inv) for r, inv in (pv[k] for pv in per_view[m])]
                    inst = view_sets[0] if len(view_sets) == 1 else merge_views(view_sets)
                    preds[m].append((inst.masks, inst.scores))
                    seconds[m] += sum(model_seconds(pv[k][0].timings, m) for pv in per_view[m])
            bar.update(len(chunk))

    summary: dict[str, dict[str, float]] = {}
    per_scan: dict[str, dict[str, dict[str, float]]] = {}
    scan_arr = np.asarray(scan_of)
    for m in models:
        summary[m] = evaluate_frames(gt, preds[m], valid=valid, coco_ap=coco_ap)
        summary[m]["frames_per_s"] = len(gt) / seconds[m] if seconds[m] > 0 else float("nan")
        per_scan[m] = {}
        for s in dict.fromkeys(scan_of):
            idx = np.flatnonzero(scan_arr == s)
            per_scan[m][s] = evaluate_frames([gt[i] for i in idx], [preds[m][i] for i in idx], valid=[valid[i] for i in idx])
    per_group: dict[str, dict[str, dict[str, float]]] = {}
    if group_of is not None:
        group_arr = np.asarray([group_of(s) for s in scan_of])
        for m in models:
            per_group[m] = {}
            for g in dict.fromkeys(group_arr.tolist()):
                idx = np.flatnonzero(group_arr == g)
                per_group[m][g] = evaluate_frames([gt[i] for i in idx], [preds[m][i] for i in idx],
                                                  valid=[valid[i] for i in idx], coco_ap=coco_ap)
    settings = {"tta": tta, "models": list(models), "n_frames": len(gt), "parameters": predictor.parameters_dict(),
                # the rows scored with the gate and windows off (the networks on whole frames)
                "whole_frame_models": [m for runner, scored in passes if runner is not predictor for m in scored]}
    return EvaluationReport(summary=summary, per_scan=per_scan, settings=settings, per_group=per_group)


def _tta_views():
    """(forward, inverse) pairs of the test-time views. torch (through the augmentations) is
    imported here: scoring without ``tta`` (the classical finder's, say) never pays for it."""
    from dipid.train.augment import tta_views  # torch, torchvision

    return tta_views()


def _unview(inst: Instances, inverse) -> Instances:
    if len(inst) == 0:
        return inst
    masks = np.ascontiguousarray(inverse(inst.masks))
    return Instances.from_masks(masks, inst.scores, inst.sources)
