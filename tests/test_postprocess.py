"""Tests of dipid.postprocess on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest

from dipid.io.coco import FrameLabels
from dipid.postprocess import connected_instances, fuse_instances, mask_nms, masks_to_boxes
from dipid.results import SOURCE_FLAGS

SHAPE = (12, 16)
SOURCE_TLM, SOURCE_SSL, SOURCE_CLASSICAL = SOURCE_FLAGS["tlm"], SOURCE_FLAGS["ssl"], SOURCE_FLAGS["classical"]


def box_mask(rows: slice, cols: slice, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def test_masks_to_boxes_exclusive_corners_and_empty():
    m = np.zeros((2, *SHAPE), bool)
    m[0, 1:3, 3:6] = True   # rows 1-2, cols 3-5
    m[0, 7, 9] = True       # a stray pixel widens the box
    boxes = masks_to_boxes(m)
    assert boxes.dtype == np.float32 and boxes.shape == (2, 4)
    np.testing.assert_array_equal(boxes[0], [3, 1, 10, 8])
    np.testing.assert_array_equal(boxes[1], [0, 0, 0, 0])
    assert masks_to_boxes(np.zeros((0, *SHAPE), bool)).shape == (0, 4)


def test_masks_to_boxes_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    masks = rng.random((6, *SHAPE)) < 0.05
    masks[:, 5, 5] = True  # none empty
    expected = FrameLabels.from_masks("s", 0, masks).boxes_xyxy()
    np.testing.assert_array_equal(masks_to_boxes(masks), expected)


def test_mask_nms_suppresses_by_mask_iou():
    a = box_mask(slice(0, 4), slice(0, 5))   # 20 px
    b = box_mask(slice(0, 4), slice(0, 4))   # IoU with a = 16/20 = 0.8
    c = box_mask(slice(6, 9), slice(6, 9))   # disjoint
    masks = np.stack([b, a, c])
    keep = mask_nms(masks, np.array([0.8, 0.9, 0.7]), iou_threshold=0.5)
    np.testing.assert_array_equal(keep, [1, 2])  # a (best) survives, b suppressed, c kept
    np.testing.assert_array_equal(mask_nms(masks, np.array([0.8, 0.9, 0.7]), iou_threshold=0.85), [1, 0, 2])


def test_mask_nms_keeps_masks_whose_boxes_overlap():
    # Two L shapes interleaved: boxes overlap with IoU 25/36 > 0.5, pixels are disjoint. Box NMS
    # at 0.5 would drop one.
    first = np.zeros(SHAPE, bool)
    first[0, 0:6] = True
    first[0:6, 0] = True
    second = np.zeros(SHAPE, bool)
    second[5, 1:6] = True
    second[0:5, 5] = True
    boxes = masks_to_boxes(np.stack([first, second]))
    np.testing.assert_array_equal(boxes, [[0, 0, 6, 6], [1, 0, 6, 6]])
    np.testing.assert_array_equal(mask_nms(np.stack([first, second]), np.array([0.9, 0.8])), [0, 1])


def test_mask_nms_threshold_is_strict_and_handles_edge_sizes():
    a = box_mask(slice(0, 2), slice(0, 4))  # 8 px
    b = box_mask(slice(0, 2), slice(2, 6))  # 8 px, 4 shared: IoU = 4/12
    a2 = box_mask(slice(0, 2), slice(0, 3))  # IoU with a = 6/8 = 0.75
    masks = np.stack([a, a2])
    np.testing.assert_array_equal(mask_nms(masks, np.array([0.9, 0.5]), iou_threshold=0.75), [0, 1])
    np.testing.assert_array_equal(mask_nms(masks, np.array([0.9, 0.5]), iou_threshold=0.74), [0])
    np.testing.assert_array_equal(mask_nms(np.stack([a, b]), np.array([0.2, 0.9]), iou_threshold=0.3), [1])
    assert mask_nms(np.zeros((0, *SHAPE), bool), np.zeros(0)).size == 0
    np.testing.assert_array_equal(mask_nms(a[None], np.array([0.1])), [0])


def test_connected_instances_areas_scores_and_order():
    binary = np.zeros(SHAPE, bool)
    binary[0:2, 0:3] = True     # 6 px, probability 0.6
    binary[5:7, 5:7] = True     # 4 px, probability 0.9
    binary[10, 10:12] = True    # 2 px: below min_area
    probability = np.zeros(SHAPE)
    probability[0:2, 0:3] = 0.6
    probability[5:7, 5:7] = 0.9
    probability[5, 5] = 0.5     # mean of the 4 px: (0.5 + 3 * 0.9) / 4 = 0.8
    masks, scores = connected_instances(binary, min_area=4, probability=probability)
    assert masks.shape == (2, *SHAPE) and masks.dtype == bool and scores.dtype == np.float32
    np.testing.assert_allclose(scores, [0.8, 0.6], rtol=1e-6)
    np.testing.assert_array_equal(masks[0], box_mask(slice(5, 7), slice(5, 7)))
    np.testing.assert_array_equal(masks[1], box_mask(slice(0, 2), slice(0, 3)))
    masks, scores = connected_instances(binary, min_area=1)
    assert len(masks) == 3
    np.testing.assert_array_equal(scores, [1.0, 1.0, 1.0])
    # without probabilities, ties keep raster order of the components
    np.testing.assert_array_equal(masks.sum(axis=(1, 2)), [6, 4, 2])


def test_connected_instances_connectivity():
    binary = np.zeros(SHAPE, bool)
    binary[0:2, 0:2] = True
    binary[2:4, 2:4] = True  # touches the first block only at a corner
    assert len(connected_instances(binary, connectivity=2).masks) == 1
    assert len(connected_instances(binary, connectivity=1).masks) == 2
    empty = connected_instances(np.zeros(SHAPE, bool))
    assert empty.masks.shape == (0, *SHAPE) and empty.scores.shape == (0,)
    with pytest.raises(ValueError):
        connected_instances(binary, connectivity=3)


# --- fusion ----------------------------------------------------------------------------------

SHAPE_FUSION = (30, 40)


def _fusion_case():
    shape = SHAPE_FUSION
    t0 = box_mask(slice(2, 8), slice(2, 8), shape)       # 36 px, score 0.8
    t1 = box_mask(slice(2, 12), slice(20, 30), shape)    # 100 px, score 0.6
    s0 = box_mask(slice(4, 10), slice(4, 10), shape)     # IoU with t0 = 16/56 = 0.29 -> confirms t0
    s1 = box_mask(slice(20, 25), slice(2, 7), shape)     # far from everything, score 0.7
    s2 = box_mask(slice(20, 25), slice(30, 35), shape)   # far, but score 0.3
    s3 = box_mask(slice(5, 7), slice(24, 26), shape)     # 4 px inside t1: IoU 0.04, but all inside
    tlm = (np.stack([t0, t1]), np.array([0.8, 0.6]))
    ssl = (np.stack([s0, s1, s2, s3]), np.array([0.5, 0.7, 0.3, 0.4]))
    return tlm, ssl


def test_fuse_instances_rule():
    (tm, ts), (sm, ss) = _fusion_case()
    masks, scores, sources = fuse_instances(tm, ts, sm, ss)
    # t0 confirmed by s0: 1 - 0.2 * 0.5 = 0.9; s1 added (0.7); t1 confirmed by s3: 1 - 0.4 * 0.6 = 0.76;
    # s2 below ssl_min_score; s0 and s3 are not added a second time.
    np.testing.assert_allclose(scores, [0.9, 0.76, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(sources, [SOURCE_TLM | SOURCE_SSL, SOURCE_TLM | SOURCE_SSL, SOURCE_SSL])
    assert sources.dtype == np.uint8
    np.testing.assert_array_equal(masks[0], tm[0])  # TLM masks are kept as they are
    np.testing.assert_array_equal(masks[1], tm[1])
    np.testing.assert_array_equal(masks[2], sm[1])


def test_fuse_instances_knobs():
    (tm, ts), (sm, ss) = _fusion_case()
    _, scores, sources = fuse_instances(tm, ts, sm, ss, add_unmatched_ssl=False)
    np.testing.assert_array_equal(sources, [3, 3])
    _, scores, sources = fuse_instances(tm, ts, sm, ss, ssl_min_score=0.2)
    np.testing.assert_allclose(scores, [0.9, 0.76, 0.7, 0.3], rtol=1e-6)
    # s1 (25 px) is added, s2 (25 px, 0.3) too at score 0.2, neither with a 26-px minimum area
    _, scores, _ = fuse_instances(tm, ts, sm, ss, ssl_min_score=0.2, ssl_min_area=26)
    np.testing.assert_allclose(scores, [0.9, 0.76], rtol=1e-6)
    # with a stricter match IoU s0 no longer confirms t0 (IoU 0.29, and only 16 of its 36 px inside)
    _, scores, sources = fuse_instances(tm, ts, sm, ss, match_iou=0.6, ssl_min_score=0.6)
    np.testing.assert_allclose(scores, [0.8, 0.76, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(sources, [SOURCE_TLM, 3, SOURCE_SSL])


def test_fuse_instances_tlm_min_score_drops_unconfirmed_tlm_instances():
    (tm, ts), (sm, ss) = _fusion_case()
    strict = dict(match_iou=0.6, ssl_min_score=0.6)  # s0 no longer confirms t0 (0.8)
    masks, scores, sources = fuse_instances(tm, ts, sm, ss, tlm_min_score=0.9, **strict)
    np.testing.assert_allclose(scores, [0.76, 0.7], rtol=1e-6)  # t0 dropped, t1 (confirmed) stays
    np.testing.assert_array_equal(sources, [3, SOURCE_SSL])
    np.testing.assert_array_equal(masks[0], tm[1])
    _, scores, _ = fuse_instances(tm, ts, sm, ss, tlm_min_score=0.8, **strict)  # >= keeps it
    np.testing.assert_allclose(scores, [0.8, 0.76, 0.7], rtol=1e-6)
    # above 1: only instances the SSLM agrees with; confirmed ones never depend on it
    _, scores, sources = fuse_instances(tm, ts, sm, ss, tlm_min_score=1.01)
    np.testing.assert_allclose(scores, [0.9, 0.76, 0.7], rtol=1e-6)


def test_fuse_instances_refine_uses_ssl_edges_near_the_instance():
    (tm, ts), (sm, ss) = _fusion_case()
    masks, _, _ = fuse_instances(tm, ts, sm, ss, refine_with_ssl=True, refine_margin=1)
    # t0 becomes s0 cut to t0 grown by one pixel (rows 1-8, cols 1-8): rows 4-8, cols 4-8
    np.testing.assert_array_equal(masks[0], box_mask(slice(4, 9), slice(4, 9), SHAPE_FUSION))
    # t1 becomes its only confirming component s3
    np.testing.assert_array_equal(masks[1], sm[3])


def test_fuse_instances_nms_and_empty_inputs():
    shape = (10, 10)
    t = box_mask(slice(0, 4), slice(0, 4), shape)
    tm = np.stack([t, t])  # a duplicate TLM detection
    masks, scores, sources = fuse_instances(tm, np.array([0.9, 0.5]), np.zeros((0, *shape), bool), np.zeros(0))
    np.testing.assert_allclose(scores, [0.9])
    np.testing.assert_array_equal(sources, [SOURCE_TLM])
    only_ssl = fuse_instances(np.zeros((0, *shape), bool), np.zeros(0), t[None], np.array([0.6]))
    np.testing.assert_array_equal(only_ssl.sources, [SOURCE_SSL])
    nothing = fuse_instances(np.zeros((0, *shape), bool), np.zeros(0), np.zeros((0, *shape), bool), np.zeros(0))
    assert nothing.masks.shape == (0, *shape) and nothing.scores.shape == (0,) and nothing.sources.shape == (0,)
    with pytest.raises(ValueError):
        fuse_instances(tm, np.array([0.9, 0.5]), np.zeros((0, 9, 9), bool), np.zeros(0))


def test_fuse_instances_classical_confirms_adds_and_refines():
    (tm, ts), _ = _fusion_case()
    shape = SHAPE_FUSION
    no_ssl = (np.zeros((0, *shape), bool), np.zeros(0))
    c0 = box_mask(slice(3, 8), slice(3, 8), shape)      # 25 px inside t0 (36 px): confirms it
    c1 = box_mask(slice(30, 34), slice(30, 34), shape)  # a peak the TLM missed, score 0.8
    c2 = box_mask(slice(30, 33), slice(2, 5), shape)    # another, score 0.4
    cm, cs = np.stack([c0, c1, c2]), np.array([0.5, 0.8, 0.4])
    # confirmation only: t0 keeps its TLM mask, gains the classical flag and 1 - 0.2 * 0.5 = 0.9;
    # t1 (0.6) is unconfirmed and dropped by tlm_min_score 0.7; nothing is added
    masks, scores, sources = fuse_instances(tm, ts, *no_ssl, tlm_min_score=0.7, classical_masks=cm,
                                            classical_scores=cs)
    np.testing.assert_allclose(scores, [0.9], rtol=1e-6)
    np.testing.assert_array_equal(sources, [1 | SOURCE_CLASSICAL])
    np.testing.assert_array_equal(masks[0], tm[0])
    # added peaks above their minimum score, flagged classical only; edges from the classical mask
    masks, scores, sources = fuse_instances(tm, ts, *no_ssl, tlm_min_score=0.7, classical_masks=cm,
                                            classical_scores=cs, add_unmatched_classical=True,
                                            classical_min_score=0.5, refine_with_classical=True, refine_margin=1)
    np.testing.assert_allclose(scores, [0.9, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(sources, [1 | SOURCE_CLASSICAL, SOURCE_CLASSICAL])
    np.testing.assert_array_equal(masks[0], c0)
    np.testing.assert_array_equal(masks[1], c1)
    # with the SSLM too, a TLM instance both confirm gets both flags and both scores combined
    (_, _), (sm, ss) = _fusion_case()
    _, scores, sources = fuse_instances(tm, ts, sm, ss, add_unmatched_ssl=False, classical_masks=cm,
                                        classical_scores=cs)
    np.testing.assert_allclose(scores[0], 1 - 0.2 * 0.5 * 0.5, rtol=1e-6)
    assert sources[0] == 1 | 2 | SOURCE_CLASSICAL
    with pytest.raises(ValueError, match="classical"):
        fuse_instances(tm, ts, *no_ssl, classical_masks=cm[:, :5], classical_scores=cs)


def test_fuse_instances_agreeing_evidence_makes_a_two_of_three_vote():
    shape = (40, 40)
    t0 = box_mask(slice(2, 8), slice(2, 8), shape)        # TLM alone: no other detector agrees
    s0 = box_mask(slice(20, 26), slice(20, 26), shape)    # SSLM component ...
    c0 = box_mask(slice(21, 25), slice(21, 25), shape)    # ... and a classical peak inside it: they agree
    s1 = box_mask(slice(30, 34), slice(2, 6), shape)      # SSLM alone
    c1 = box_mask(slice(2, 6), slice(30, 34), shape)      # classical alone
    tm, ts = t0[None], np.array([0.95])
    sm, ss = np.stack([s0, s1]), np.array([0.6, 0.99])
    cm, cs = np.stack([c0, c1]), np.array([0.7, 0.99])
    vote = dict(tlm_min_score=1.01, add_unmatched_ssl=False, add_unmatched_classical=False,
                classical_masks=cm, classical_scores=cs)
    # majority vote: only the SSLM + classical agreement survives, with the classical mask
    masks, scores, sources = fuse_instances(tm, ts, sm, ss, add_agreeing_evidence=True, **vote)
    np.testing.assert_array_equal(sources, [SOURCE_SSL | SOURCE_CLASSICAL])
    np.testing.assert_array_equal(masks[0], c0)
    np.testing.assert_allclose(scores, [1 - 0.4 * 0.3], rtol=1e-6)
    # without the option, the same settings keep nothing
    masks, _, _ = fuse_instances(tm, ts, sm, ss, **vote)
    assert len(masks) == 0
    # with lone evidence added too, the agreeing pair is one instance, not two (nor an SSLM duplicate)
    masks, _, sources = fuse_instances(tm, ts, sm, ss, add_agreeing_evidence=True,
                                       **{**vote, "add_unmatched_ssl": True, "ssl_min_score": 0.5})
    assert sorted(sources.tolist()) == [SOURCE_SSL, SOURCE_SSL | SOURCE_CLASSICAL]
    # evidence that confirmed a TLM instance is not reused for an agreement
    masks, _, sources = fuse_instances(s0[None], np.array([0.9]), sm, ss, add_agreeing_evidence=True, **vote)
    np.testing.assert_array_equal(sources, [SOURCE_TLM | SOURCE_SSL | SOURCE_CLASSICAL])


def test_fuse_instances_classical_edges_win_over_ssl_edges():
    shape = (30, 30)
    tlm = box_mask(slice(5, 15), slice(5, 15), shape)
    ssl = box_mask(slice(4, 16), slice(4, 16), shape)        # spreads into the halo
    classical = box_mask(slice(7, 13), slice(7, 13), shape)  # the peak's own pixels
    both = dict(refine_with_ssl=True, refine_with_classical=True, refine_margin=2, add_unmatched_ssl=False,
                classical_masks=classical[None], classical_scores=np.array([0.9]))
    masks, _, sources = fuse_instances(tlm[None], np.array([0.8]), ssl[None], np.array([0.9]), **both)
    np.testing.assert_array_equal(masks[0], classical)
    assert sources[0] == SOURCE_TLM | SOURCE_SSL | SOURCE_CLASSICAL
    # with the SSLM's edges only, the instance takes them, cut to the TLM mask dilated by 2
    masks, _, _ = fuse_instances(tlm[None], np.array([0.8]), ssl[None], np.array([0.9]),
                                 **{**both, "refine_with_classical": False})
    np.testing.assert_array_equal(masks[0], ssl)


def test_fuse_instances_classical_anchor_networks_vouch_for_rank_and_complete():
    shape = (40, 40)
    c0 = box_mask(slice(2, 6), slice(2, 6), shape)        # classical peak inside ...
    t0 = box_mask(slice(1, 9), slice(1, 9), shape)        # ... a larger TLM instance: they agree
    c1 = box_mask(slice(2, 6), slice(30, 34), shape)      # classical alone (a ring or streak, say)
    t1 = box_mask(slice(20, 26), slice(20, 26), shape)    # TLM instance ...
    s1 = box_mask(slice(21, 25), slice(21, 25), shape)    # ... the SSLM agrees: a peak the finder missed
    t2 = box_mask(slice(30, 34), slice(2, 6), shape)      # TLM alone
    cm, cs = np.stack([c0, c1]), np.array([0.5, 0.6])
    tm, ts = np.stack([t0, t1, t2]), np.array([0.8, 0.7, 0.95])
    sm, ss = s1[None], np.array([0.6])
    anchored = dict(anchor="classical", classical_masks=cm, classical_scores=cs, add_unmatched_ssl=False,
                    tlm_min_score=1.01, add_agreeing_evidence=True)
    # every classical peak stays (keep score 0), with its own pixel-exact mask; the confirmed one
    # ranks first with the combined score; the TLM + SSLM agreement joins with the TLM's mask
    masks, scores, sources = fuse_instances(tm, ts, sm, ss, classical_min_score=0.0, **anchored)
    np.testing.assert_allclose(scores, [1 - 0.5 * 0.2, 1 - 0.3 * 0.4, 0.6], rtol=1e-6)
    np.testing.assert_array_equal(sources, [SOURCE_CLASSICAL | SOURCE_TLM, SOURCE_TLM | SOURCE_SSL,
                                            SOURCE_CLASSICAL])
    np.testing.assert_array_equal(masks[0], c0)
    np.testing.assert_array_equal(masks[1], t1)
    np.testing.assert_array_equal(masks[2], c1)
    # above 1 the networks veto every classical peak they do not confirm; a lone TLM instance joins
    # once tlm_min_score <= 1 lets it
    masks, _, sources = fuse_instances(tm, ts, sm, ss, **{**anchored, "classical_min_score": 1.01,
                                                          "tlm_min_score": 0.9})
    assert sorted(sources.tolist()) == sorted([SOURCE_CLASSICAL | SOURCE_TLM, SOURCE_TLM | SOURCE_SSL, SOURCE_TLM])
    assert not any((m & c1).any() for m in masks)
    # the classical anchor needs classical peaks, and the anchor must be a known one
    with pytest.raises(ValueError, match="classical_masks"):
        fuse_instances(tm, ts, sm, ss, anchor="classical")
    with pytest.raises(ValueError, match="valid: tlm, classical"):
        fuse_instances(tm, ts, sm, ss, anchor="sslm")


def test_predictor_settings_check_the_fusion_anchor():
    from dipid.errors import DipidError, UnknownNameError
    from dipid.predict import PredictorSettings

    assert PredictorSettings(fusion_anchor="classical", fusion_classical=True).fusion_options()["anchor"] == "classical"
    with pytest.raises(UnknownNameError):
        PredictorSettings(fusion_anchor="ssl")
    with pytest.raises(DipidError, match="fusion_classical"):
        PredictorSettings(fusion_anchor="classical")


@pytest.mark.parametrize("anchor", ["tlm", "classical"])
def test_fusion_keeps_only_candidates_says_when_joint_needs_the_anchor(anchor):
    """When the function says the fusion returns only the anchor's candidates, a frame without
    candidates fuses to nothing whatever the evidence; when it says otherwise, some evidence joins."""
    from dipid.postprocess import fusion_keeps_only_candidates

    shape = (30, 30)
    tlm = np.stack([box_mask(slice(2, 8), slice(2, 8), shape), box_mask(slice(20, 26), slice(20, 26), shape)])
    ssl = np.stack([box_mask(slice(3, 7), slice(3, 7), shape), box_mask(slice(21, 24), slice(21, 24), shape)])
    classical = np.stack([box_mask(slice(21, 25), slice(21, 25), shape), box_mask(slice(2, 5), slice(20, 23), shape)])
    tlm_scores, ssl_scores, classical_scores = np.array([0.9, 0.95]), np.array([0.9, 0.9]), np.array([0.9, 0.9])
    none = np.zeros((0, *shape), bool)
    verdicts = set()
    for add_ssl in (False, True):
        for agree in (False, True):
            for add_classical in (False, True):
                for tlm_min in (0.5, 1.01):
                    options = dict(anchor=anchor, add_unmatched_ssl=add_ssl, add_agreeing_evidence=agree,
                                   add_unmatched_classical=add_classical, tlm_min_score=tlm_min,
                                   ssl_min_score=0.0, classical_min_score=0.0)
                    if anchor == "tlm":  # no TLM instance: only evidence could make joint
                        found = fuse_instances(none, np.zeros(0), ssl, ssl_scores, classical_masks=classical,
                                               classical_scores=classical_scores, **options)
                    else:  # no classical peak
                        found = fuse_instances(tlm, tlm_scores, ssl, ssl_scores, classical_masks=none,
                                               classical_scores=np.zeros(0), **options)
                    only = fusion_keeps_only_candidates(**options, match_iou=0.1)  # other options ignored
                    verdicts.add(only)
                    assert (len(found.scores) == 0) == only, options
    assert verdicts == {True, False}
    with pytest.raises(ValueError, match="valid: tlm, classical"):
        fusion_keeps_only_candidates(anchor="joint")
