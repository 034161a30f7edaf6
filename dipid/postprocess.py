"""Turning network outputs into instances: thresholds, mask NMS, components and fusion.

NumPy and SciPy only (no torch), so the same code serves every model and the classical finder.
Instances are plain arrays here: ``masks`` (N, H, W) bool and ``scores`` (N,) float32; the typed
result classes that carry them, and the source flags, live in :mod:`dipid.results`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from dipid.errors import UnknownNameError
from dipid.metrics import mask_intersection_matrix, mask_iou_matrix
from dipid.results import SOURCE_FLAGS

__all__ = [
    "Components",
    "FusedInstances",
    "masks_to_boxes",
    "mask_nms",
    "connected_instances",
    "fuse_instances",
    "fusion_keeps_only_candidates",
    "FUSION_ANCHORS",
]

logger = logging.getLogger(__name__)

#: Whose instances :func:`fuse_instances` keeps as candidates, the other detectors confirming them.
FUSION_ANCHORS = ("tlm", "classical")


def _masks(masks: np.ndarray, name: str = "masks") -> np.ndarray:
    arr = np.asarray(masks)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W), got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _scores(scores: np.ndarray, n: int, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float32).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{n} masks but {arr.size} {name}")
    return arr


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of masks.

    Args:
        masks: (N, H, W) bool.
    Returns:
        (N, 4) float32 ``(x0, y0, x1, y1)`` in pixels with x1, y1 exclusive (last column/row + 1);
        all zeros for an empty mask.
    """
    masks = _masks(masks)
    n = len(masks)
    boxes = np.zeros((n, 4), np.float32)
    if n == 0:
        return boxes
    rows = masks.any(axis=2)  # (N, H)
    cols = masks.any(axis=1)  # (N, W)
    nonempty = rows.any(axis=1)
    h, w = masks.shape[1:]
    boxes[:, 0] = np.argmax(cols, axis=1)
    boxes[:, 1] = np.argmax(rows, axis=1)
    boxes[:, 2] = w - np.argmax(cols[:, ::-1], axis=1)
    boxes[:, 3] = h - np.argmax(rows[:, ::-1], axis=1)
    boxes[~nonempty] = 0
    return boxes


def _areas(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N,) int64 pixel counts (full-frame masks; ``Instances.areas`` for crops)."""
    return _masks(masks).sum(axis=(1, 2), dtype=np.int64)


def mask_nms(masks: np.ndarray, scores: np.ndarray, *, iou_threshold: float = 0.5) -> np.ndarray:
    """Greedy non-maximum suppression on mask IoU (not box IoU).

    Visiting instances from the highest score down (ties in index order), an instance is dropped
    when its mask IoU with an already kept one is > ``iou_threshold`` (strictly, as torchvision's
    box NMS). Box overlap is a poor proxy here: neighbouring peaks on a detector often have
    overlapping boxes while their masks barely touch.

    Args:
        masks: (N, H, W) bool; scores: (N,) float.
    Returns:
        (K,) int64 indices of the kept instances, by descending score.
    """
    masks = _masks(masks)
    scores = _scores(scores, len(masks))
    order = np.argsort(-scores, kind="stable")
    if len(order) <= 1:
        return order.astype(np.int64)
    ious = mask_iou_matrix(masks[order], masks[order])
    suppressed = np.zeros(len(order), bool)
    kept = []
    for rank in range(len(order)):
        if suppressed[rank]:
            continue
        kept.append(rank)
        suppressed |= ious[rank] > iou_threshold
    return order[np.asarray(kept, np.int64)].astype(np.int64)


class Components(NamedTuple):
    """Connected components as instances (unpacks as ``masks, scores``).

    Attributes:
        masks: (N, H, W) bool, one component each, by descending score.
        scores: (N,) float32.
    """

    masks: np.ndarray
    scores: np.ndarray


def connected_instances(
    binary: np.ndarray,
    *,
    min_area: int = 4,
    probability: np.ndarray | None = None,
    connectivity: int = 2,
) -> Components:
    """Split a foreground map into instances, one per connected component.

    Args:
        binary: (H, W) bool foreground.
        min_area: components with fewer pixels are dropped.
        probability: optional (H, W) float; a component's score is its mean inside. Without it
            every score is 1.0.
        connectivity: 1 = 4-neighbours, 2 = 8-neighbours (diagonal pixels join).
    Returns:
        :class:`Components`, sorted by descending score (ties in raster order of the component).
    """
    binary = np.asarray(binary, dtype=bool)
    if binary.ndim != 2:
        raise ValueError(f"binary must be (H, W), got shape {binary.shape}")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity}")
    h, w = binary.shape
    labels, n = ndimage.label(binary, structure=ndimage.generate_binary_structure(2, connectivity))
    if n == 0:
        return Components(np.zeros((0, h, w), bool), np.zeros(0, np.float32))
    flat = labels.ravel()
    # One pass over the frame for all areas and probability sums, rather than one per component.
    areas = np.bincount(flat, minlength=n + 1)[1:]
    if probability is None:
        component_scores = np.ones(n, np.float64)
    else:
        probability = np.asarray(probability, dtype=np.float64)
        if probability.shape != binary.shape:
            raise ValueError(f"probability is {probability.shape}, binary {binary.shape}")
        component_scores = np.bincount(flat, weights=probability.ravel(), minlength=n + 1)[1:] / np.maximum(areas, 1)
    kept_labels = np.flatnonzero(areas >= min_area)
    kept_labels = kept_labels[np.argsort(-component_scores[kept_labels], kind="stable")]
    slices = ndimage.find_objects(labels)
    masks = np.zeros((kept_labels.size, h, w), bool)
    for k, index in enumerate(kept_labels):
        window = slices[index]
        masks[k][window] = labels[window] == index + 1
    return Components(masks, component_scores[kept_labels].astype(np.float32))


class FusedInstances(NamedTuple):
    """The joint output (unpacks as ``masks, scores, sources``).

    Attributes:
        masks: (N, H, W) bool, by descending score.
        scores: (N,) float32 in [0, 1].
        sources: (N,) uint8 bit flags of :data:`dipid.results.SOURCE_FLAGS` (tlm 1, ssl 2,
            classical 4): the detectors that found or confirmed each instance.
    """

    masks: np.ndarray
    scores: np.ndarray
    sources: np.ndarray


def _flag(model: str) -> np.uint8:
    return np.uint8(SOURCE_FLAGS[model])


def _combined_confidence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Probability that at least one of two independent detectors is right: 1 - (1-p)(1-q)."""
    return 1.0 - (1.0 - p) * (1.0 - q)


def fuse_instances(
    tlm_masks: np.ndarray,
    tlm_scores: np.ndarray,
    ssl_masks: np.ndarray,
    ssl_scores: np.ndarray,
    *,
    anchor: str = "tlm",
    match_iou: float = 0.1,
    tlm_min_score: float = 0.0,
    ssl_min_score: float = 0.5,
    ssl_min_area: int = 0,
    add_unmatched_ssl: bool = True,
    refine_with_ssl: bool = False,
    refine_margin: int = 2,
    nms_iou: float = 0.5,
    classical_masks: np.ndarray | None = None,
    classical_scores: np.ndarray | None = None,
    classical_min_score: float = 0.5,
    classical_min_area: int = 0,
    add_unmatched_classical: bool = False,
    refine_with_classical: bool = False,
    add_agreeing_evidence: bool = False,
) -> FusedInstances:
    """Combine Mask R-CNN (TLM) instances with clustering (SSLM) components, and optionally the
    classical finder's peaks: dipid's ``joint`` output.

    One detector is the *anchor* (``anchor="tlm"``, the default): its instances are the
    candidates, and the others' masks are *evidence* about them. Each kind of evidence is used
    the same way, with its own settings. The rule:

    1. A piece of evidence *confirms* a candidate when their mask IoU is >= ``match_iou`` or at
       least half of either lies inside the other.
    2. A confirmed candidate is kept with its mask, the score ``1 - (1 - s_0) prod_k (1 - s_k)``
       (``s_0`` its own score, ``s_k`` the best confirming score of each kind of evidence), i.e.
       the chance that at least one of independent detectors is right, and the source flags of
       every detector that agreed. An unconfirmed one is kept when its score is >= the anchor's
       minimum score (``tlm_min_score``; 0: always; above 1: never, another detector must agree).
    3. With ``refine_with_ssl`` (``refine_with_classical``), a confirmed candidate's mask becomes
       the union of its confirming SSLM components (classical peaks) cut to the candidate dilated
       by ``refine_margin`` pixels: clustering and background-subtracted thresholds draw
       pixel-exact edges where the TLM's 28 x 28 mask head is coarse, and the cut keeps two
       instances that share one component apart. If the cut is empty the mask stays. When both
       kinds refine a candidate, the classical peaks' edges win: a threshold on
       background-subtracted counts follows the peak's own pixels, where the SSLM's components
       spread into the halo (a union of the two would take the larger of each edge).
    4. With ``add_unmatched_ssl`` (``add_unmatched_classical``), evidence that confirms no
       candidate is added as an instance of its own (source 2, or 4) when its score is >=
       ``ssl_min_score`` (``classical_min_score``) and its area is >= ``ssl_min_area``
       (``classical_min_area``) pixels: peaks the anchor missed (small lone components are
       mostly noise).
    5. With ``add_agreeing_evidence``, two pieces of evidence of different kinds that confirm no
       candidate but agree with each other (the test of step 1) join `joint` as one instance
       whatever their own minimum scores: the second kind's mask (the classical peak's, or the
       TLM's when the classical finder is the anchor), the combined score of step 2 and both
       flags. With the anchor's lone candidates and each lone kind of evidence kept out, this
       makes `joint` a majority vote: a peak is reported where at least two of the three
       detectors agree. Their failures differ (the TLM's false positives on structured
       backgrounds, the SSLM's on noise, the classical finder's on rings and streaks), so
       agreement removes most false peaks while a real peak is rarely missed by two of them.
    6. Mask NMS at ``nms_iou`` (see :func:`mask_nms`) removes duplicates, such as one missed peak
       added by both the SSLM and the classical finder.

    ``anchor="classical"`` swaps the roles of the TLM and the classical finder (it needs
    ``classical_masks``): the classical peaks are the candidates, kept with their pixel-exact
    masks when a network confirms them or their own score is >= ``classical_min_score``; the
    TLM's instances are evidence, a lone one added (step 4) when its score is >=
    ``tlm_min_score`` <= 1, and ``add_agreeing_evidence`` adds a TLM instance an SSLM component
    agrees with. The networks then vouch for, rank and complete the classical finder's peaks,
    which is the better rule while the networks are the weaker detectors on validation scans: it
    keeps the finder's edges and its recall away from the scenes the networks were trained on,
    and their agreement moves real peaks above the finder's lone false ones.

    The thresholds say how far each model is trusted alone. Which values make ``joint`` at least
    as good as every single model depends on the models' quality, so they are chosen on
    validation scans for a set of checkpoints (``benchmarks/fusion.py``) and travel with them
    (``settings.json`` beside the weights, read by :meth:`dipid.JointPredictor.from_pretrained`).

    Args:
        tlm_masks: (N, H, W) bool; tlm_scores: (N,) float in [0, 1].
        ssl_masks: (M, H, W) bool; ssl_scores: (M,) float in [0, 1] (M may be 0).
        classical_masks: (K, H, W) bool or None; classical_scores: (K,) float in [0, 1).
        anchor: "tlm" or "classical", whose instances the others confirm.
    Returns:
        :class:`FusedInstances` by descending score.
    Raises:
        UnknownNameError: ``anchor`` is not one of the two.
    """
    if anchor not in FUSION_ANCHORS:
        raise UnknownNameError("fusion anchor", anchor, FUSION_ANCHORS)
    tlm_masks, ssl_masks = _masks(tlm_masks, "tlm_masks"), _masks(ssl_masks, "ssl_masks")
    if tlm_masks.shape[1:] != ssl_masks.shape[1:]:
        raise ValueError(f"tlm masks are {tlm_masks.shape[1:]}, ssl masks {ssl_masks.shape[1:]}")
    tlm_scores = _scores(tlm_scores, len(tlm_masks), "tlm_scores")
    ssl = _Evidence(ssl_masks, _scores(ssl_scores, len(ssl_masks), "ssl_scores"), _flag("ssl"), ssl_min_score,
                    ssl_min_area, add_unmatched_ssl, refine_with_ssl)
    classical = None
    if classical_masks is not None:
        classical_masks = _masks(classical_masks, "classical_masks")
        if classical_masks.shape[1:] != tlm_masks.shape[1:]:
            raise ValueError(f"tlm masks are {tlm_masks.shape[1:]}, classical masks {classical_masks.shape[1:]}")
        classical = _Evidence(classical_masks, _scores(classical_scores, len(classical_masks), "classical_scores"),
                              _flag("classical"), classical_min_score, classical_min_area, add_unmatched_classical,
                              refine_with_classical)
    if anchor == "tlm":
        candidates, candidate_scores, candidate_flag, keep_min_score = tlm_masks, tlm_scores, _flag("tlm"), tlm_min_score
        evidence = [ssl] if classical is None else [ssl, classical]
    else:
        if classical is None:
            raise ValueError("anchor='classical' needs classical_masks and classical_scores")
        candidates, candidate_scores = classical.masks, classical.scores
        candidate_flag, keep_min_score = classical.flag, classical_min_score
        # the TLM as evidence: its own edges never replace the classical ones (step 3)
        evidence = [ssl, _Evidence(tlm_masks, tlm_scores, _flag("tlm"), min(tlm_min_score, 1.0), 0,
                                   tlm_min_score <= 1.0, False)]

    candidate_area = _areas(candidates)
    masks = candidates.copy()
    scores = candidate_scores.astype(np.float64)
    sources = np.full(len(candidates), candidate_flag, np.uint8)
    confirmed = np.zeros(len(candidates), bool)
    structure = ndimage.generate_binary_structure(2, 2)
    reach: dict[int, np.ndarray] = {}  # candidate -> its mask dilated by refine_margin (computed once)
    for ev in evidence:  # the SSLM first, then the classical finder: the later kind's edges win
        ev.confirms = _confirmations(candidates, candidate_area, ev.masks, match_iou)  # (N, M)
        hit = ev.confirms.any(axis=1)
        if hit.any():
            best = np.where(ev.confirms, ev.scores[None, :], -np.inf).max(axis=1)
            scores[hit] = _combined_confidence(scores[hit], best[hit].astype(np.float64))
            sources[hit] |= ev.flag
            if ev.refine:
                for i in np.flatnonzero(hit):
                    if i not in reach:
                        reach[i] = ndimage.binary_dilation(candidates[i], structure=structure,
                                                           iterations=refine_margin) if refine_margin > 0 else candidates[i]
                    refined = ev.masks[ev.confirms[i]].any(axis=0) & reach[i]
                    if refined.any():
                        masks[i] = refined
        confirmed |= hit

    kept = confirmed | (candidate_scores >= keep_min_score)
    masks, scores, sources = masks[kept], scores[kept], sources[kept]
    used = [ev.confirms.any(axis=0) for ev in evidence]  # evidence that confirmed a candidate
    if add_agreeing_evidence and len(evidence) == 2:
        first, second = evidence
        lone_first, lone_second = np.flatnonzero(~used[0]), np.flatnonzero(~used[1])
        if lone_first.size and lone_second.size:
            agree = _confirmations(second.masks[lone_second], _areas(second.masks[lone_second]),
                                   first.masks[lone_first], match_iou)  # (lone second, lone first)
            agreed = agree.any(axis=1)
            if agreed.any():
                best_first = np.where(agree, first.scores[lone_first][None, :], -np.inf).max(axis=1)[agreed]
                joined = lone_second[agreed]
                masks = np.concatenate([masks, second.masks[joined]])
                scores = np.concatenate([scores, _combined_confidence(second.scores[joined].astype(np.float64),
                                                                      best_first.astype(np.float64))])
                sources = np.concatenate([sources, np.full(joined.size, first.flag | second.flag, np.uint8)])
                used[1][joined] = True
                used[0][lone_first[agree[agreed].any(axis=0)]] = True
    for ev, ev_used in zip(evidence, used):
        if not ev.add_unmatched:
            continue
        area = _areas(ev.masks)
        new = np.flatnonzero(~ev_used & (ev.scores >= ev.min_score) & (area >= ev.min_area))
        if new.size:
            masks = np.concatenate([masks, ev.masks[new]])
            scores = np.concatenate([scores, ev.scores[new].astype(np.float64)])
            sources = np.concatenate([sources, np.full(new.size, ev.flag, np.uint8)])

    scores32 = scores.astype(np.float32)
    keep = mask_nms(masks, scores32, iou_threshold=nms_iou)
    logger.debug("fused %d %s candidates + %s -> %d instances (%d confirmed)", len(candidates), anchor,
                 " + ".join(str(len(ev.masks)) for ev in evidence), keep.size, int(confirmed.sum()))
    return FusedInstances(masks[keep], scores32[keep], sources[keep])


def fusion_keeps_only_candidates(
    *,
    anchor: str = "tlm",
    tlm_min_score: float = 0.0,
    add_unmatched_ssl: bool = True,
    add_unmatched_classical: bool = False,
    add_agreeing_evidence: bool = False,
    **_other: Any,
) -> bool:
    """Whether :func:`fuse_instances` with these options returns only the anchor's candidates.

    True when no evidence can join `joint` without a candidate: no lone SSLM components (step 4),
    no agreeing pairs (step 5), and no lone instances of the third detector (the classical finder's
    with ``anchor="tlm"``, the TLM's with ``anchor="classical"``, whose lone instances join when
    ``tlm_min_score`` <= 1). Then a frame on which the anchor finds nothing has an empty `joint`
    whatever the other detectors say, so they need not run on it. Takes the keyword options of
    :func:`fuse_instances` (others are ignored).
    """
    if anchor not in FUSION_ANCHORS:
        raise UnknownNameError("fusion anchor", anchor, FUSION_ANCHORS)
    if add_unmatched_ssl or add_agreeing_evidence:
        return False
    return not add_unmatched_classical if anchor == "tlm" else tlm_min_score > 1.0


@dataclass
class _Evidence:
    """One kind of evidence fused with the TLM's instances, and how far it is trusted."""

    masks: np.ndarray
    scores: np.ndarray
    flag: np.uint8
    min_score: float
    min_area: int
    add_unmatched: bool
    refine: bool
    confirms: np.ndarray | None = None


def _confirmations(candidates: np.ndarray, candidate_area: np.ndarray, other: np.ndarray,
                   match_iou: float) -> np.ndarray:
    """(N, M) bool: other mask j confirms candidate i (IoU >= match_iou, or half of either inside
    the other: a small classical peak inside a TLM instance's halo agrees with it, and so does a
    TLM instance inside a large SSLM component)."""
    inter = mask_intersection_matrix(candidates, other)
    other_area = _areas(other)
    union = candidate_area[:, None] + other_area[None, :] - inter
    iou = inter / np.maximum(union, 1)
    inside = np.maximum(inter / np.maximum(other_area, 1)[None, :], inter / np.maximum(candidate_area, 1)[:, None])
    return (inter > 0) & ((iou >= match_iou) | (inside >= 0.5))
