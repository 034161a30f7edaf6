"""Evaluation measures for peak segmentation and hit finding (NumPy only, no torch).

Everything here is a pure function on arrays: boolean instance masks ``(N, H, W)``, scores
``(N,)`` and per-frame truth. Results are plain numbers, small dataclasses or dicts of columns
that ``pandas.DataFrame`` takes directly. Three families of measures are provided:

* **DiPID's measure** (:func:`union_iou`, :func:`mean_union_iou`, :func:`false_positive_area`):
  the IoU of the union of all predicted peak pixels with the union of all true peak pixels,
  averaged over frames that have peaks, plus the predicted area on frames that have none.
* **Instances** (:func:`match_instances`, :func:`precision_recall_f1`, :func:`coco_mask_ap`):
  one-to-one matching at a mask-IoU threshold, and COCO mask AP through pycocotools.
* **Hit finding** (:func:`roc_curve`, :func:`roc_auc`, :func:`hit_confusion`): is there a peak
  in this frame at all, scored per frame, as hit finders for serial crystallography report it.

:func:`evaluate_frames` and :func:`per_frame_table` combine them for ``dipid evaluate`` and the
benchmarks.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from dipid.io.coco import FrameLabels, encode_masks

__all__ = [
    "mask_intersection_matrix",
    "mask_iou_matrix",
    "union_iou",
    "mean_union_iou",
    "false_positive_area",
    "InstanceMatch",
    "match_instances",
    "precision_recall_f1",
    "coco_mask_ap",
    "roc_curve",
    "roc_auc",
    "hit_confusion",
    "per_frame_table",
    "evaluate_frames",
]

logger = logging.getLogger(__name__)

# Above this many multiply-adds the dense float matmul is slower than a sparse product over the
# (few) set pixels; peaks cover a small fraction of a frame, so the sparse form wins for big N, M.
_DENSE_MATMUL_LIMIT = 20_000_000


def _as_masks(masks: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(masks)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) masks, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _as_mask_stack(masks: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) or a single (H, W) mask -> (N, H, W) bool."""
    arr = np.asarray(masks)
    if arr.ndim == 2:
        arr = arr[None]
    return _as_masks(arr, name)


def _apply_valid(masks: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    if valid is None:
        return masks
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != masks.shape[1:]:
        raise ValueError(f"valid must be (H, W) = {masks.shape[1:]}, got shape {valid.shape}")
    return masks & valid


def mask_intersection_matrix(a: np.ndarray, b: np.ndarray, *, valid: np.ndarray | None = None) -> np.ndarray:
    """Pixel counts of every pairwise intersection.

    Args:
        a: (N, H, W) bool masks.
        b: (M, H, W) bool masks.
        valid: optional (H, W) bool; pixels where it is False count in neither mask.
    Returns:
        (N, M) int64, entry (i, j) = number of pixels in both ``a[i]`` and ``b[j]``.
    """
    a = _apply_valid(_as_masks(a, "a"), valid)
    b = _apply_valid(_as_masks(b, "b"), valid)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"mask sizes differ: {a.shape[1:]} vs {b.shape[1:]}")
    n, m = len(a), len(b)
    out = np.zeros((n, m), np.int64)
    if n == 0 or m == 0:
        return out
    # Only pixels inside both sets' footprints can intersect; cropping to that box first makes the
    # product cheap for the usual case of small peaks.
    rows = np.flatnonzero(a.any(axis=(0, 2)) & b.any(axis=(0, 2)))
    cols = np.flatnonzero(a.any(axis=(0, 1)) & b.any(axis=(0, 1)))
    if rows.size == 0 or cols.size == 0:
        return out
    crop = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a_flat = a[crop].reshape(n, -1)
    b_flat = b[crop].reshape(m, -1)
    n_pixels = a_flat.shape[1]
    if n * m * n_pixels <= _DENSE_MATMUL_LIMIT:
        # float32 sums integers exactly below 2**24 pixels; use float64 beyond that.
        dtype = np.float32 if n_pixels < 2**24 else np.float64
        inter = a_flat.astype(dtype) @ b_flat.astype(dtype).T
    else:
        from scipy import sparse

        def to_sparse(flat: np.ndarray) -> "sparse.csr_matrix":
            r, c = np.nonzero(flat)
            return sparse.csr_matrix((np.ones(r.size, np.float64), (r, c)), shape=flat.shape)

        inter = (to_sparse(a_flat) @ to_sparse(b_flat).T).toarray()
    out[:] = np.rint(inter).astype(np.int64)
    return out


def mask_iou_matrix(a: np.ndarray, b: np.ndarray, *, valid: np.ndarray | None = None) -> np.ndarray:
    """Pairwise mask IoU.

    Args:
        a: (N, H, W) bool masks.
        b: (M, H, W) bool masks.
        valid: optional (H, W) bool; bad pixels (False) are removed from both masks first.
    Returns:
        (N, M) float64 IoU in [0, 1]; 0 where both masks are empty.
    """
    a = _apply_valid(_as_masks(a, "a"), valid)
    b = _apply_valid(_as_masks(b, "b"), valid)
    inter = mask_intersection_matrix(a, b)
    area_a = a.sum(axis=(1, 2), dtype=np.int64)
    area_b = b.sum(axis=(1, 2), dtype=np.int64)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return iou.astype(np.float64)


def union_iou(pred_masks: np.ndarray, gt_masks: np.ndarray, *, valid: np.ndarray | None = None) -> float:
    """DiPID's per-frame measure: IoU of the union of predictions with the union of the truth.

    Args:
        pred_masks: (N, H, W) or (H, W) bool predicted peak masks (N may be 0).
        gt_masks: (M, H, W) or (H, W) bool true peak masks (M may be 0).
        valid: optional (H, W) bool; bad pixels are ignored.
    Returns:
        IoU in [0, 1]; NaN when the truth has no (valid) pixels, since a frame without peaks has
        no overlap to measure (see :func:`false_positive_area` for those frames).
    """
    pred = _apply_valid(_as_mask_stack(pred_masks, "pred_masks"), valid).any(axis=0)
    gt = _apply_valid(_as_mask_stack(gt_masks, "gt_masks"), valid).any(axis=0)
    if pred.shape != gt.shape:
        raise ValueError(f"mask sizes differ: {pred.shape} vs {gt.shape}")
    union = np.count_nonzero(pred | gt)
    if not gt.any():
        return float("nan")
    return float(np.count_nonzero(pred & gt) / union)


def mean_union_iou(
    frames: Iterable[float | tuple[np.ndarray, np.ndarray]], *, valid: np.ndarray | None = None
) -> float:
    """Mean of :func:`union_iou` over the frames that have ground truth.

    Args:
        frames: per-frame IoU values (NaN for frames without truth, as :func:`union_iou` gives),
            or per-frame ``(pred_masks, gt_masks)`` pairs, or a mix.
        valid: optional (H, W) bool bad-pixel exclusion, used for the pairs.
    Returns:
        The mean over frames with truth; NaN when no frame has any.
    """
    values = []
    for item in frames:
        if isinstance(item, tuple):
            values.append(union_iou(item[0], item[1], valid=valid))
        else:
            values.append(float(item))
    arr = np.asarray(values, np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def false_positive_area(pred_masks: np.ndarray, *, valid: np.ndarray | None = None) -> int:
    """Number of (valid) pixels predicted as peak; meant for frames that have no true peaks.

    Args:
        pred_masks: (N, H, W) or (H, W) bool.
        valid: optional (H, W) bool; bad pixels are not counted.
    Returns:
        Pixel count of the union of the predictions.
    """
    pred = _apply_valid(_as_mask_stack(pred_masks, "pred_masks"), valid)
    return int(np.count_nonzero(pred.any(axis=0)))


@dataclass
class InstanceMatch:
    """One-to-one matching of predicted to true instances in one frame.

    Attributes:
        pairs: (K, 2) int64 rows of (prediction index, truth index).
        ious: (K,) float64 mask IoU of each pair.
        tp, fp, fn: matched pairs, unmatched predictions, unmatched truths.
        unmatched_pred: (fp,) int64 indices of predictions with no partner.
        unmatched_gt: (fn,) int64 indices of truths with no partner.
    """

    pairs: np.ndarray
    ious: np.ndarray
    tp: int
    fp: int
    fn: int
    unmatched_pred: np.ndarray
    unmatched_gt: np.ndarray


def match_instances(
    pred_masks: np.ndarray,
    pred_scores: np.ndarray,
    gt_masks: np.ndarray,
    *,
    iou_threshold: float = 0.5,
    valid: np.ndarray | None = None,
) -> InstanceMatch:
    """Greedy one-to-one matching by descending score, as COCO does.

    Predictions are visited from the highest score down (ties in index order); each takes the
    still-free truth it overlaps most, if that IoU is >= ``iou_threshold`` (and above 0).

    Args:
        pred_masks: (N, H, W) bool; pred_scores: (N,) float.
        gt_masks: (M, H, W) bool.
        iou_threshold: minimum mask IoU of a match.
        valid: optional (H, W) bool bad-pixel exclusion.
    """
    pred = _as_masks(pred_masks, "pred_masks")
    gt = _as_masks(gt_masks, "gt_masks")
    scores = np.asarray(pred_scores, np.float64).reshape(-1)
    if len(scores) != len(pred):
        raise ValueError(f"{len(pred)} masks but {len(scores)} scores")
    ious = mask_iou_matrix(pred, gt, valid=valid)
    gt_taken = np.zeros(len(gt), bool)
    pairs: list[tuple[int, int]] = []
    pair_ious: list[float] = []
    for i in np.argsort(-scores, kind="stable"):
        if not len(gt):
            break
        candidates = np.where(gt_taken, -1.0, ious[i])
        j = int(np.argmax(candidates))
        if candidates[j] >= iou_threshold and candidates[j] > 0:
            gt_taken[j] = True
            pairs.append((int(i), j))
            pair_ious.append(float(candidates[j]))
    pairs_arr = np.asarray(pairs, np.int64).reshape(-1, 2)
    matched_pred = np.zeros(len(pred), bool)
    matched_pred[pairs_arr[:, 0]] = True
    unmatched_pred = np.flatnonzero(~matched_pred).astype(np.int64)
    unmatched_gt = np.flatnonzero(~gt_taken).astype(np.int64)
    return InstanceMatch(
        pairs=pairs_arr,
        ious=np.asarray(pair_ious, np.float64),
        tp=len(pairs),
        fp=int(unmatched_pred.size),
        fn=int(unmatched_gt.size),
        unmatched_pred=unmatched_pred,
        unmatched_gt=unmatched_gt,
    )


def precision_recall_f1(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1 from counts, defined for every input.

    Convention for empty denominators: precision is 1 when nothing was predicted (no claim was
    wrong) and recall is 1 when there was nothing to find (nothing was missed). So a frame with
    no peaks and no predictions scores P = R = F1 = 1; predictions on an empty frame give P = 0,
    R = 1, F1 = 0; nothing predicted on a frame with peaks gives P = 1, R = 0, F1 = 0.
    """
    precision = tp / (tp + fp) if tp + fp > 0 else 1.0
    recall = tp / (tp + fn) if tp + fn > 0 else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def coco_mask_ap(
    gt: Sequence[FrameLabels], predictions: Sequence[tuple[np.ndarray, np.ndarray]]
) -> dict[str, float]:
    """COCO mask average precision (one category, all areas) through pycocotools.

    Args:
        gt: the labelled frames.
        predictions: for each frame of ``gt`` (same order), ``(masks (N, H, W) bool, scores (N,))``.
    Returns:
        ``{"AP": ..., "AP50": ..., "AP75": ...}`` in [0, 1]; all 0.0 when there are truths but no
        predictions at all, all NaN when there are no truths. AP is the mean over IoU 0.50:0.95;
        up to max(100, most predictions in a frame) detections per frame are counted.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(gt) != len(predictions):
        raise ValueError(f"{len(gt)} labelled frames but {len(predictions)} predictions")
    n_gt = sum(len(fl) for fl in gt)
    n_pred = sum(len(np.asarray(p[1]).reshape(-1)) for p in predictions)
    if n_gt == 0:
        return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    if n_pred == 0:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}

    images, gt_anns, dets = [], [], []
    most_per_frame = 0
    for image_id, (fl, (masks, scores)) in enumerate(zip(gt, predictions), start=1):
        images.append({"id": image_id, "height": fl.height, "width": fl.width})
        for rle, area, box in zip(fl.rles, fl.areas(), fl.boxes_xyxy()):
            gt_anns.append({
                "id": len(gt_anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]}, "area": float(area),
                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
            })
        masks = _as_masks(masks, "prediction masks")
        scores = np.asarray(scores, np.float64).reshape(-1)
        if len(masks) != len(scores):
            raise ValueError(f"frame {image_id - 1}: {len(masks)} masks but {len(scores)} scores")
        if len(masks) and masks.shape[1:] != (fl.height, fl.width):
            raise ValueError(f"frame {image_id - 1}: masks are {masks.shape[1:]}, labels {(fl.height, fl.width)}")
        most_per_frame = max(most_per_frame, len(masks))
        for rle, score in zip(encode_masks(masks), scores):
            dets.append({"image_id": image_id, "category_id": 1, "segmentation": rle, "score": float(score)})

    # pycocotools reports progress with print(); keep it off the user's stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": gt_anns, "categories": [{"id": 1, "name": "peak"}]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.maxDets = [1, 10, max(100, most_per_frame)]
        evaluator.evaluate()
        evaluator.accumulate()
    # precision: [iou threshold, recall, category, area range, max dets]; -1 marks "undefined".
    precision = evaluator.eval["precision"][:, :, 0, 0, -1]
    iou_thresholds = evaluator.params.iouThrs

    def mean_defined(values: np.ndarray) -> float:
        defined = values[values > -1]
        return float(defined.mean()) if defined.size else float("nan")

    return {
        "AP": mean_defined(precision),
        "AP50": mean_defined(precision[np.isclose(iou_thresholds, 0.5)]),
        "AP75": mean_defined(precision[np.isclose(iou_thresholds, 0.75)]),
    }


def _hit_arrays(is_hit: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hits = np.asarray(is_hit, dtype=bool).reshape(-1)
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if hits.shape != values.shape:
        raise ValueError(f"is_hit has {hits.size} frames but scores has {values.size}")
    if np.isnan(values).any():
        raise ValueError("scores contain NaN")
    return hits, values


def roc_curve(is_hit: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Receiver operating characteristic of a per-frame hit score.

    A frame is called a hit when its score is >= the threshold. One point per distinct score,
    from the strictest (threshold +inf: nothing called, point (0, 0)) to the loosest (everything
    called, point (1, 1)).

    Args:
        is_hit: (F,) bool, whether each frame truly holds a peak.
        scores: (F,) float, higher = more likely a hit.
    Returns:
        ``{"fpr", "tpr", "thresholds"}``, each (T + 1,) float64 for T distinct scores; ``tpr`` is
        NaN when there are no true hits and ``fpr`` NaN when there are no true misses.
    """
    hits, values = _hit_arrays(is_hit, scores)
    order = np.argsort(-values, kind="mergesort")
    sorted_scores, sorted_hits = values[order], hits[order]
    # Last index of each run of equal scores: tied frames enter the curve together, which is what
    # makes the area count ties as one half (see roc_auc).
    last_of_run = np.flatnonzero(np.r_[np.diff(sorted_scores) != 0, values.size > 0])
    true_pos = np.r_[0, np.cumsum(sorted_hits)[last_of_run]].astype(np.float64)
    false_pos = np.r_[0, last_of_run + 1].astype(np.float64) - true_pos
    n_pos, n_neg = int(hits.sum()), int((~hits).sum())
    tpr = true_pos / n_pos if n_pos else np.full_like(true_pos, np.nan)
    fpr = false_pos / n_neg if n_neg else np.full_like(false_pos, np.nan)
    thresholds = np.r_[np.inf, sorted_scores[last_of_run]].astype(np.float64)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


def roc_auc(is_hit: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoid rule).

    Equals the probability that a random true hit scores higher than a random non-hit, ties
    counted as one half (the Mann-Whitney U statistic over n_hit * n_miss). NaN when either class
    is absent.
    """
    curve = roc_curve(is_hit, scores)
    fpr, tpr = curve["fpr"], curve["tpr"]
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan")
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def hit_confusion(is_hit: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion counts and rates of calling frames with score >= ``threshold`` hits.

    Returns:
        ``tp, fp, tn, fn`` (int) and ``sensitivity`` (tp/(tp+fn)), ``specificity`` (tn/(tn+fp)),
        ``accuracy`` and ``precision`` (tp/(tp+fp)); a rate whose denominator is 0 is NaN (these
        are population rates; an undefined one should show as missing in a table, not as 0 or 1).
    """
    hits, values = _hit_arrays(is_hit, scores)
    called = values >= threshold
    tp = int(np.sum(called & hits))
    fp = int(np.sum(called & ~hits))
    tn = int(np.sum(~called & ~hits))
    fn = int(np.sum(~called & hits))

    def ratio(num: int, den: int) -> float:
        return num / den if den else float("nan")

    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "accuracy": ratio(tp + tn, tp + fp + tn + fn),
        "precision": ratio(tp, tp + fp),
    }


def _frame_valid(valid: np.ndarray | Sequence[np.ndarray] | None, index: int, n_frames: int) -> np.ndarray | None:
    """The (H, W) valid mask of frame ``index`` from None, one (H, W) mask or one per frame."""
    if valid is None:
        return None
    if isinstance(valid, np.ndarray) and valid.ndim == 2:
        return valid
    if len(valid) != n_frames:
        raise ValueError(f"valid has {len(valid)} masks for {n_frames} frames")
    return np.asarray(valid[index], bool)


def per_frame_table(
    gt_frames: Sequence[np.ndarray],
    pred_frames: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    valid: np.ndarray | Sequence[np.ndarray] | None = None,
    iou_threshold: float = 0.5,
    frames: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """One row per frame, as columns ready for ``pandas.DataFrame``.

    Args:
        gt_frames: per frame, (M, H, W) bool true masks.
        pred_frames: per frame, ``(masks (N, H, W) bool, scores (N,))``.
        valid: None, one (H, W) bool mask for all frames, or one per frame.
        iou_threshold: mask IoU for an instance match.
        frames: frame numbers for the ``frame`` column (default 0..F-1).
    Returns:
        Columns ``frame, n_gt, n_pred, iou`` (:func:`union_iou`, NaN without truth), ``tp, fp,
        fn`` (instances at ``iou_threshold``), ``best_score`` (highest score, 0 when no
        prediction) and ``pred_area`` (predicted pixels, the false-positive area on empty frames).
    """
    if len(gt_frames) != len(pred_frames):
        raise ValueError(f"{len(gt_frames)} truth frames but {len(pred_frames)} prediction frames")
    n = len(gt_frames)
    frame_numbers = np.arange(n, dtype=np.int64) if frames is None else np.asarray(frames, np.int64)
    if frame_numbers.shape != (n,):
        raise ValueError(f"frames has {frame_numbers.size} numbers for {n} frames")
    cols: dict[str, list] = {k: [] for k in ("n_gt", "n_pred", "iou", "tp", "fp", "fn", "best_score", "pred_area")}
    for i, (gt_masks, (pred_masks, pred_scores)) in enumerate(zip(gt_frames, pred_frames)):
        frame_valid = _frame_valid(valid, i, n)
        gt_masks = _as_masks(gt_masks, "gt masks")
        pred_masks = _as_masks(pred_masks, "prediction masks")
        scores = np.asarray(pred_scores, np.float64).reshape(-1)
        match = match_instances(pred_masks, scores, gt_masks, iou_threshold=iou_threshold, valid=frame_valid)
        cols["n_gt"].append(len(gt_masks))
        cols["n_pred"].append(len(pred_masks))
        cols["iou"].append(union_iou(pred_masks, gt_masks, valid=frame_valid))
        cols["tp"].append(match.tp)
        cols["fp"].append(match.fp)
        cols["fn"].append(match.fn)
        cols["best_score"].append(float(scores.max()) if scores.size else 0.0)
        cols["pred_area"].append(false_positive_area(pred_masks, valid=frame_valid))
    table: dict[str, np.ndarray] = {"frame": frame_numbers}
    for key in ("n_gt", "n_pred", "tp", "fp", "fn", "pred_area"):
        table[key] = np.asarray(cols[key], np.int64)
    table["iou"] = np.asarray(cols["iou"], np.float64)
    table["best_score"] = np.asarray(cols["best_score"], np.float64)
    order = ("frame", "n_gt", "n_pred", "iou", "tp", "fp", "fn", "best_score", "pred_area")
    return {k: table[k] for k in order}


def evaluate_frames(
    gt_frames: Sequence[np.ndarray],
    pred_frames: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    valid: np.ndarray | Sequence[np.ndarray] | None = None,
    iou_threshold: float = 0.5,
    coco_ap: bool = False,
) -> dict[str, float]:
    """Summary of a set of predicted frames against the truth.

    Args:
        gt_frames, pred_frames, valid, iou_threshold: as for :func:`per_frame_table`.
        coco_ap: also compute COCO mask ``AP``, ``AP50``, ``AP75`` (slower), bad pixels removed
            from all masks first.
    Returns:
        ``mean_iou`` (:func:`mean_union_iou` over frames with peaks), ``fp_area_per_empty_frame``
        (mean predicted pixels on frames without peaks; NaN when there are none), ``precision,
        recall, f1`` over all instances, ``hit_auc`` (:func:`roc_auc` of frame score = best
        instance score, 0 without predictions), ``tp, fp, fn``, ``n_frames``,
        ``n_frames_with_peaks`` and ``n_empty_frames``.
    """
    table = per_frame_table(gt_frames, pred_frames, valid=valid, iou_threshold=iou_threshold)
    has_peaks = table["n_gt"] > 0
    empty_area = table["pred_area"][~has_peaks]
    tp, fp, fn = int(table["tp"].sum()), int(table["fp"].sum()), int(table["fn"].sum())
    summary: dict[str, float] = {
        "mean_iou": mean_union_iou(table["iou"]),
        "fp_area_per_empty_frame": float(empty_area.mean()) if empty_area.size else float("nan"),
        **precision_recall_f1(tp, fp, fn),
        "hit_auc": roc_auc(has_peaks, table["best_score"]),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_frames": len(table["frame"]),
        "n_frames_with_peaks": int(has_peaks.sum()),
        "n_empty_frames": int((~has_peaks).sum()),
    }
    if coco_ap:
        n = len(gt_frames)
        labels, predictions = [], []
        for i, (gt_masks, (pred_masks, pred_scores)) in enumerate(zip(gt_frames, pred_frames)):
            frame_valid = _frame_valid(valid, i, n)
            labels.append(FrameLabels.from_masks("", i, _apply_valid(_as_masks(gt_masks, "gt masks"), frame_valid)))
            predictions.append((_apply_valid(_as_masks(pred_masks, "prediction masks"), frame_valid), pred_scores))
        summary.update(coco_mask_ap(labels, predictions))
    logger.debug("evaluated %d frames: %s", summary["n_frames"], summary)
    return summary
