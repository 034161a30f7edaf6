"""Tests of dipid.metrics against values worked out by hand on tiny masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dipid import metrics
from dipid.io.coco import FrameLabels
from dipid.metrics import (
    coco_mask_ap,
    evaluate_frames,
    false_positive_area,
    hit_confusion,
    mask_intersection_matrix,
    mask_iou_matrix,
    match_instances,
    mean_union_iou,
    per_frame_table,
    precision_recall_f1,
    roc_auc,
    roc_curve,
    union_iou,
)


def box_mask(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


# --- mask IoU --------------------------------------------------------------------------------

def test_mask_iou_matrix_hand_values():
    shape = (4, 4)
    a = np.stack([box_mask(shape, slice(0, 2), slice(0, 2)),   # 4 px, top-left
                  box_mask(shape, slice(3, 4), slice(0, 4))])  # 4 px, bottom row
    b = np.stack([box_mask(shape, slice(0, 2), slice(1, 3)),   # 4 px, shares column 1 with a[0]
                  np.zeros(shape, bool)])
    iou = mask_iou_matrix(a, b)
    assert iou.shape == (2, 2) and iou.dtype == np.float64
    # a[0] & b[0] = 2 px; union = 4 + 4 - 2 = 6.
    np.testing.assert_allclose(iou, [[2 / 6, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(mask_intersection_matrix(a, b), [[2, 0], [0, 0]])


def test_mask_iou_matrix_valid_removes_bad_pixels_from_both():
    shape = (4, 4)
    a = box_mask(shape, slice(0, 2), slice(0, 2))[None]
    b = box_mask(shape, slice(0, 2), slice(1, 3))[None]
    valid = np.ones(shape, bool)
    valid[:, 1] = False  # the shared column is bad: nothing left in common
    assert mask_iou_matrix(a, b, valid=valid)[0, 0] == 0.0
    valid = np.ones(shape, bool)
    valid[:, 0] = False  # a keeps column 1 (2 px), b keeps columns 1-2 (4 px), 2 px shared
    assert mask_iou_matrix(a, b, valid=valid)[0, 0] == pytest.approx(2 / 4)


@pytest.mark.parametrize("force_sparse", [False, True])
def test_mask_iou_matrix_matches_pairwise_loop(force_sparse, monkeypatch):
    if force_sparse:
        monkeypatch.setattr(metrics, "_DENSE_MATMUL_LIMIT", 0)
    rng = np.random.default_rng(3)
    a = rng.random((5, 12, 17)) < 0.3
    b = rng.random((4, 12, 17)) < 0.4
    b[2] = False  # an empty mask
    expected = np.zeros((5, 4))
    for i in range(5):
        for j in range(4):
            union = np.count_nonzero(a[i] | b[j])
            expected[i, j] = np.count_nonzero(a[i] & b[j]) / union if union else 0.0
    np.testing.assert_allclose(mask_iou_matrix(a, b), expected)


def test_mask_iou_matrix_empty_sets_and_bad_shapes():
    assert mask_iou_matrix(np.zeros((0, 3, 3), bool), np.ones((2, 3, 3), bool)).shape == (0, 2)
    with pytest.raises(ValueError):
        mask_iou_matrix(np.zeros((1, 3, 3), bool), np.zeros((1, 3, 4), bool))
    with pytest.raises(ValueError):
        mask_iou_matrix(np.zeros((3, 3), bool), np.zeros((1, 3, 3), bool))


# --- DiPID's union IoU -----------------------------------------------------------------------

def test_union_iou_hand_values():
    shape = (5, 5)
    gt = np.stack([box_mask(shape, slice(0, 2), slice(0, 2)), box_mask(shape, slice(3, 5), slice(3, 5))])  # 8 px
    pred = box_mask(shape, slice(0, 2), slice(0, 3))[None]  # 6 px, 4 of them true
    # intersection 4, union 8 + 6 - 4 = 10
    assert union_iou(pred, gt) == pytest.approx(0.4)
    # A 2D mask is taken as one instance.
    assert union_iou(pred[0], gt) == pytest.approx(0.4)
    assert union_iou(np.zeros((0, 5, 5), bool), gt) == 0.0
    valid = np.ones(shape, bool)
    valid[:, 2] = False  # drops the 2 wrongly predicted pixels: intersection 4, union 8
    assert union_iou(pred, gt, valid=valid) == pytest.approx(0.5)


def test_union_iou_is_nan_without_truth():
    assert math.isnan(union_iou(np.ones((1, 3, 3), bool), np.zeros((0, 3, 3), bool)))
    assert math.isnan(union_iou(np.zeros((0, 3, 3), bool), np.zeros((2, 3, 3), bool)))


def test_mean_union_iou_skips_frames_without_truth():
    assert mean_union_iou([0.5, float("nan"), 1.0]) == pytest.approx(0.75)
    assert math.isnan(mean_union_iou([float("nan")]))
    assert math.isnan(mean_union_iou([]))
    shape = (3, 3)
    perfect = (box_mask(shape, slice(0, 1), slice(0, 3))[None], box_mask(shape, slice(0, 1), slice(0, 3))[None])
    missed = (np.zeros((0, 3, 3), bool), box_mask(shape, slice(2, 3), slice(0, 3))[None])
    empty = (np.ones((1, 3, 3), bool), np.zeros((0, 3, 3), bool))
    assert mean_union_iou([perfect, missed, empty]) == pytest.approx(0.5)


def test_false_positive_area_counts_union_of_valid_pixels():
    shape = (4, 4)
    pred = np.stack([box_mask(shape, slice(0, 2), slice(0, 2)), box_mask(shape, slice(1, 3), slice(1, 3))])
    assert false_positive_area(pred) == 7  # 4 + 4 - 1 overlapping pixel
    valid = np.ones(shape, bool)
    valid[0, :] = False
    assert false_positive_area(pred, valid=valid) == 5
    assert false_positive_area(np.zeros((0, 4, 4), bool)) == 0


# --- instances -------------------------------------------------------------------------------

def test_match_instances_is_greedy_by_score():
    shape = (10, 10)
    gt = box_mask(shape, slice(0, 4), slice(0, 5))[None]  # 20 px
    pred = np.stack([
        box_mask(shape, slice(0, 4), slice(0, 4)),  # IoU 16/20 = 0.8, score 0.6
        box_mask(shape, slice(0, 3), slice(0, 4)),  # IoU 12/20 = 0.6, score 0.9: visited first
        box_mask(shape, slice(7, 9), slice(7, 9)),  # nowhere near the truth
    ])
    match = match_instances(pred, np.array([0.6, 0.9, 0.95]), gt, iou_threshold=0.5)
    np.testing.assert_array_equal(match.pairs, [[1, 0]])
    np.testing.assert_allclose(match.ious, [0.6])
    assert (match.tp, match.fp, match.fn) == (1, 2, 0)
    np.testing.assert_array_equal(match.unmatched_pred, [0, 2])
    assert match.unmatched_gt.size == 0
    # At a threshold above 0.6 the top-scoring candidate fails and the next one matches.
    match = match_instances(pred, np.array([0.6, 0.9, 0.95]), gt, iou_threshold=0.7)
    np.testing.assert_array_equal(match.pairs, [[0, 0]])


def test_match_instances_one_to_one_and_misses():
    shape = (6, 6)
    gt = np.stack([box_mask(shape, slice(0, 2), slice(0, 2)), box_mask(shape, slice(4, 6), slice(4, 6))])
    pred = np.stack([gt[0], gt[0]])  # two copies of the same prediction
    match = match_instances(pred, np.array([0.5, 0.7]), gt)
    np.testing.assert_array_equal(match.pairs, [[1, 0]])
    assert (match.tp, match.fp, match.fn) == (1, 1, 1)
    np.testing.assert_array_equal(match.unmatched_gt, [1])
    nothing = match_instances(np.zeros((0, 6, 6), bool), np.zeros(0), gt)
    assert (nothing.tp, nothing.fp, nothing.fn) == (0, 0, 2)
    assert nothing.pairs.shape == (0, 2)
    with pytest.raises(ValueError):
        match_instances(pred, np.array([0.5]), gt)


def test_precision_recall_f1_values_and_conventions():
    prf = precision_recall_f1(3, 1, 2)
    assert prf["precision"] == pytest.approx(0.75)
    assert prf["recall"] == pytest.approx(0.6)
    assert prf["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert precision_recall_f1(0, 0, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert precision_recall_f1(0, 0, 4) == {"precision": 1.0, "recall": 0.0, "f1": 0.0}
    assert precision_recall_f1(0, 2, 0) == {"precision": 0.0, "recall": 1.0, "f1": 0.0}


# --- COCO AP ---------------------------------------------------------------------------------

def _labels(masks: np.ndarray, frame: int = 0) -> FrameLabels:
    return FrameLabels.from_masks("scan.nxs", frame, masks)


def test_coco_mask_ap_perfect_and_partial():
    shape = (20, 30)
    gt = np.stack([box_mask(shape, slice(0, 10), slice(0, 10)), box_mask(shape, slice(12, 18), slice(15, 25))])
    perfect = coco_mask_ap([_labels(gt)], [(gt, np.array([0.9, 0.8]))])
    assert perfect == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})

    # One truth of 100 px found by a 62-px subset: IoU 0.62 passes thresholds 0.50, 0.55, 0.60
    # of the ten 0.50:0.95, so AP = 3/10, AP50 = 1, AP75 = 0.
    partial = np.zeros((1, *shape), bool)
    partial[0, 0:6, 0:10] = True
    partial[0, 6, 0:2] = True
    assert partial.sum() == 62
    ap = coco_mask_ap([_labels(gt[:1])], [(partial, np.array([0.9]))])
    assert ap["AP"] == pytest.approx(0.3)
    assert ap["AP50"] == pytest.approx(1.0)
    assert ap["AP75"] == pytest.approx(0.0)


def test_coco_mask_ap_false_positive_ranked_first_halves_precision():
    shape = (20, 30)
    gt = box_mask(shape, slice(0, 10), slice(0, 10))[None]
    wrong = box_mask(shape, slice(12, 18), slice(15, 25))[None]
    # The false positive scores higher: recall reaches 1 only at precision 1/2, so the
    # interpolated precision is 0.5 at every recall level.
    ap = coco_mask_ap([_labels(gt)], [(np.concatenate([wrong, gt]), np.array([0.9, 0.5]))])
    assert ap["AP50"] == pytest.approx(0.5)
    # Ranked last it costs nothing.
    ap = coco_mask_ap([_labels(gt)], [(np.concatenate([wrong, gt]), np.array([0.1, 0.5]))])
    assert ap["AP50"] == pytest.approx(1.0)


def test_coco_mask_ap_over_frames_and_edge_cases(capsys):
    shape = (16, 16)
    gt0 = box_mask(shape, slice(0, 5), slice(0, 5))[None]
    gt1 = box_mask(shape, slice(8, 14), slice(8, 14))[None]
    labels = [_labels(gt0, 0), _labels(gt1, 1)]
    # Found in frame 0 only: recall tops out at 1/2 with precision 1 -> AP50 = 51 recall points
    # of 101 at precision 1 = 0.50495...
    ap = coco_mask_ap(labels, [(gt0, np.array([0.9])), (np.zeros((0, *shape), bool), np.zeros(0))])
    assert ap["AP50"] == pytest.approx(51 / 101)
    assert capsys.readouterr().out == ""  # pycocotools' prints are kept off stdout
    none = coco_mask_ap(labels, [(np.zeros((0, *shape), bool), np.zeros(0))] * 2)
    assert none == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    empty = coco_mask_ap([_labels(np.zeros((0, *shape), bool))], [(gt0, np.array([0.9]))])
    assert all(math.isnan(v) for v in empty.values())
    with pytest.raises(ValueError):
        coco_mask_ap(labels, [(gt0, np.array([0.9]))])


# --- hit finding -----------------------------------------------------------------------------

def test_roc_curve_hand_values():
    curve = roc_curve(np.array([1, 0, 1, 0], bool), np.array([0.9, 0.8, 0.4, 0.1]))
    np.testing.assert_allclose(curve["thresholds"], [np.inf, 0.9, 0.8, 0.4, 0.1])
    np.testing.assert_allclose(curve["tpr"], [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(curve["fpr"], [0, 0, 0.5, 0.5, 1])


def test_roc_curve_groups_ties_into_one_point():
    curve = roc_curve(np.array([1, 0, 1]), np.array([0.5, 0.5, 0.2]))
    np.testing.assert_allclose(curve["thresholds"], [np.inf, 0.5, 0.2])
    np.testing.assert_allclose(curve["tpr"], [0, 0.5, 1])
    np.testing.assert_allclose(curve["fpr"], [0, 1, 1])


def test_roc_auc_hand_values_and_missing_class():
    # pairs (hit, miss): (0.9>0.8), (0.9>0.1), (0.4<0.8), (0.4>0.1) -> 3/4
    assert roc_auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.1])) == pytest.approx(0.75)
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])) == pytest.approx(1.0)
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))
    assert math.isnan(roc_auc(np.array([0, 0]), np.array([0.2, 0.3])))
    with pytest.raises(ValueError):
        roc_auc(np.array([1, 0]), np.array([0.2, np.nan]))


def test_roc_auc_equals_mann_whitney_probability_with_ties():
    rng = np.random.default_rng(7)
    is_hit = rng.random(60) < 0.4
    scores = rng.integers(0, 6, 60).astype(float)  # few distinct values: many ties
    hits, misses = scores[is_hit], scores[~is_hit]
    wins = sum(1.0 if h > m else 0.5 if h == m else 0.0 for h in hits for m in misses)
    assert roc_auc(is_hit, scores) == pytest.approx(wins / (len(hits) * len(misses)))


def test_hit_confusion_counts_and_rates():
    is_hit = np.array([1, 1, 1, 0, 0], bool)
    scores = np.array([0.9, 0.5, 0.1, 0.7, 0.2])
    out = hit_confusion(is_hit, scores, 0.5)  # called: 0.9, 0.5 (>= threshold), 0.7
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (2, 1, 1, 1)
    assert out["sensitivity"] == pytest.approx(2 / 3)
    assert out["specificity"] == pytest.approx(1 / 2)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["precision"] == pytest.approx(2 / 3)
    nothing_called = hit_confusion(np.array([0, 0], bool), np.array([0.1, 0.2]), 0.5)
    assert math.isnan(nothing_called["sensitivity"]) and math.isnan(nothing_called["precision"])
    assert nothing_called["specificity"] == 1.0


# --- per-frame evaluation ----------------------------------------------------------------------

def _three_frames():
    shape = (8, 8)
    peak = box_mask(shape, slice(1, 4), slice(1, 4))[None]         # 9 px
    other_peak = box_mask(shape, slice(5, 7), slice(5, 8))[None]   # 6 px
    false_alarm = box_mask(shape, slice(0, 2), slice(4, 7))[None]  # 6 px
    none = np.zeros((0, *shape), bool)
    gt_frames = [peak, none, other_peak]
    pred_frames = [(peak, np.array([0.9])), (false_alarm, np.array([0.3])), (none, np.zeros(0))]
    return gt_frames, pred_frames


def test_per_frame_table_columns():
    import pandas as pd

    gt_frames, pred_frames = _three_frames()
    table = per_frame_table(gt_frames, pred_frames, frames=[10, 11, 12])
    assert list(table) == ["frame", "n_gt", "n_pred", "iou", "tp", "fp", "fn", "best_score", "pred_area"]
    np.testing.assert_array_equal(table["frame"], [10, 11, 12])
    np.testing.assert_array_equal(table["n_gt"], [1, 0, 1])
    np.testing.assert_array_equal(table["n_pred"], [1, 1, 0])
    np.testing.assert_allclose(table["iou"], [1.0, np.nan, 0.0])
    np.testing.assert_array_equal(table["tp"], [1, 0, 0])
    np.testing.assert_array_equal(table["fp"], [0, 1, 0])
    np.testing.assert_array_equal(table["fn"], [0, 0, 1])
    np.testing.assert_allclose(table["best_score"], [0.9, 0.3, 0.0])
    np.testing.assert_array_equal(table["pred_area"], [9, 6, 0])
    assert pd.DataFrame(table).shape == (3, 9)


def test_evaluate_frames_summary():
    gt_frames, pred_frames = _three_frames()
    summary = evaluate_frames(gt_frames, pred_frames, coco_ap=True)
    assert summary["mean_iou"] == pytest.approx(0.5)  # frames with peaks: 1.0 and 0.0
    assert summary["fp_area_per_empty_frame"] == pytest.approx(6.0)
    assert (summary["tp"], summary["fp"], summary["fn"]) == (1, 1, 1)
    assert summary["precision"] == pytest.approx(0.5)
    assert summary["recall"] == pytest.approx(0.5)
    assert summary["f1"] == pytest.approx(0.5)
    # frame scores: hits 0.9 and 0.0, the empty frame 0.3 -> one pair won, one lost
    assert summary["hit_auc"] == pytest.approx(0.5)
    assert (summary["n_frames"], summary["n_frames_with_peaks"], summary["n_empty_frames"]) == (3, 2, 1)
    # one of two truths found exactly, the false alarm ranked after it: AP50 = 51/101
    assert summary["AP50"] == pytest.approx(51 / 101)


def test_evaluate_frames_per_frame_valid_masks():
    gt_frames, pred_frames = _three_frames()
    valid = np.ones((3, 8, 8), bool)
    valid[1, 0, :] = False  # hides 3 of the 6 false-alarm pixels in the empty frame
    summary = evaluate_frames(gt_frames, pred_frames, valid=valid)
    assert summary["fp_area_per_empty_frame"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        evaluate_frames(gt_frames, pred_frames, valid=valid[:2])
    with pytest.raises(ValueError):
        evaluate_frames(gt_frames, pred_frames[:2])
