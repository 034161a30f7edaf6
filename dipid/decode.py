"""Model outputs to result objects: pure functions, one frame at a time.

* :func:`tlm_instances`: one frame's Mask R-CNN output (torchvision's dict of tensors) ->
  :class:`~dipid.results.Instances`.
* :func:`ssl_output`: one frame's SSLM peak probability -> :class:`~dipid.results.SSLOutput`
  (its thresholded mask and connected components).
* :func:`classical_instances`: one frame of :func:`dipid.classical.find_peaks_classical` ->
  :class:`~dipid.results.Instances`.
* :func:`joint_instances`: the three sets of one frame -> the fused `joint` set.

Nothing here runs a network or keeps state; :class:`dipid.predict.JointPredictor` runs the
models and calls these with its settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from dipid.postprocess import connected_instances, fuse_instances, mask_nms
from dipid.results import SOURCE_FLAGS, Instances, SSLOutput

if TYPE_CHECKING:  # only for annotations: this module never needs torch itself
    from torch import Tensor

__all__ = ["tlm_instances", "ssl_output", "classical_instances", "joint_instances", "nms_instances"]


def nms_instances(instances: Instances, iou_threshold: float) -> Instances:
    """``instances`` without those overlapping a higher-scored one by mask IoU > ``iou_threshold``."""
    if len(instances) <= 1:
        return instances
    return instances[mask_nms(instances.masks, instances.scores, iou_threshold=iou_threshold)]


def tlm_instances(
    output: Mapping[str, Tensor],
    *,
    threshold: float,
    mask_threshold: float,
    min_area: int,
    nms_iou: float | None = None,
) -> Instances:
    """One frame's TLM detections as instances.

    Args:
        output: torchvision Mask R-CNN output of one frame: ``scores`` (N,) and ``masks``
            (N, 1, H, W) per-pixel probabilities (any device and float dtype).
        threshold: minimum detection score kept.
        mask_threshold: mask probability that counts as peak.
        min_area: smallest instance kept, pixels.
        nms_iou: mask NMS at this IoU (None: none).
    """
    # Compared in torch, in the output's own dtype: under bf16 autocast the thresholds round the
    # way the network's numbers do.
    keep = output["scores"] >= threshold
    masks = (output["masks"][keep, 0] >= mask_threshold).cpu().numpy()
    scores = output["scores"][keep].float().cpu().numpy()
    instances = Instances.from_masks(masks, scores, SOURCE_FLAGS["tlm"]).filter(min_area=min_area)
    return instances if nms_iou is None else nms_instances(instances, nms_iou)


def ssl_output(
    probability: np.ndarray, *, threshold: float, min_area: int, keep_probability: bool = True
) -> SSLOutput:
    """One frame's SSLM peak probability, (H, W) float32 in [0, 1], as its mask and components.

    The mask is ``probability >= threshold``; each connected component (8-neighbours) of at least
    ``min_area`` pixels is an instance scored by its mean probability. ``keep_probability=False``
    leaves the (H, W) map out of the result (scans keep only masks).
    """
    probability = np.asarray(probability, dtype=np.float32)
    mask = probability >= threshold
    masks, scores = connected_instances(mask, min_area=min_area, probability=probability)
    return SSLOutput(
        probability=probability if keep_probability else None,
        mask=mask,
        instances=Instances.from_masks(masks, scores, SOURCE_FLAGS["ssl"]),
    )


def classical_instances(found: Any) -> Instances:
    """One frame of the classical finder (anything with (N,) ``scores`` and an (H, W) ``labels``
    image with (N, 4) ``boxes``, or (N, H, W) ``masks``) as instances. The label image is used
    when there is one: (N, H, W) masks of an Eiger 4M frame with hundreds of peaks take gigabytes."""
    if getattr(found, "labels", None) is not None and getattr(found, "boxes", None) is not None:
        return Instances.from_labels(found.labels, found.scores, SOURCE_FLAGS["classical"], boxes=found.boxes)
    return Instances.from_masks(found.masks, found.scores, SOURCE_FLAGS["classical"])


def joint_instances(
    tlm: Instances | None,
    ssl: SSLOutput | None,
    classical: Instances | None,
    shape: tuple[int, int],
    *,
    fusion: Mapping[str, Any],
    classical_evidence: bool = False,
    nms_iou: float | None = None,
) -> Instances:
    """The `joint` set of one frame of ``shape`` (H, W).

    With both TLM instances and SSLM output: their fusion (:func:`dipid.postprocess.fuse_instances`
    with the keyword options ``fusion``), the classical peaks a third kind of evidence when
    ``classical_evidence``. With one source only: that source's instances (the TLM's, else the
    SSLM's, else the classical ones), with mask NMS at ``nms_iou`` when given; with none, empty.
    """
    if tlm is not None and ssl is not None:
        third = classical if classical_evidence else None
        masks, scores, sources = fuse_instances(
            tlm.masks, tlm.scores, ssl.instances.masks, ssl.instances.scores, **fusion,
            classical_masks=None if third is None else third.masks,
            classical_scores=None if third is None else third.scores)
        return Instances.from_masks(masks, scores, sources)
    single = tlm if tlm is not None else (ssl.instances if ssl is not None else classical)
    if single is None:
        return Instances.empty(shape)
    return single if nms_iou is None else nms_instances(single, nms_iou)
