"""The batched, streaming pipeline gives the same instances as the plain one-frame-at-a-time path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dipid.io import open_scan
from dipid.metrics import mask_iou_matrix
from dipid.models import build_sslm, build_tlm
from dipid.models.normalize import normalize_counts
from dipid.postprocess import connected_instances
from dipid.predict import JointPredictor
from dipid.synth import simulate_scan


def reference_tlm(tlm, counts: np.ndarray, threshold: float, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Unoptimised: one frame, network's own low score threshold, filtering afterwards."""
    x = normalize_counts(torch.from_numpy(counts)[None])[:, None]
    with torch.no_grad():
        out = tlm(x)[0]
    keep = out["scores"] >= threshold
    masks = (out["masks"][keep, 0] >= 0.5).numpy()
    scores = out["scores"][keep].numpy()
    big = masks.sum(axis=(1, 2)) >= min_area
    return masks[big], scores[big]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    tlm = build_tlm(batchnorm="frozen").eval()
    sslm = build_sslm().eval()
    sim = simulate_scan(n_frames=5, preset="realistic", seed=21)
    path = sim.write(tmp_path_factory.mktemp("eq"), "eq").nexus
    return tlm, sslm, path


def test_batched_pipeline_matches_single_frame_path(setup):
    tlm, sslm, path = setup
    threshold, min_area = 0.45, 4
    reference_heads_thresh = tlm.net.roi_heads.score_thresh
    with open_scan(path) as scan:
        frames = [scan[i] for i in range(len(scan))]
    reference = [reference_tlm(tlm, f, threshold, min_area) for f in frames]
    predictor = JointPredictor(tlm=tlm, sslm=sslm, threshold=threshold, device="cpu")
    assert tlm.net.roi_heads.score_thresh > reference_heads_thresh  # the optimisation is on
    result = predictor.predict_scan(path, batch_size=3, use_ssl=True)
    total = 0
    for k, (ref_masks, ref_scores) in enumerate(reference):
        got = result[k].tlm
        assert len(got) == len(ref_masks), f"frame {k}"
        total += len(got)
        if len(got) == 0:
            continue
        np.testing.assert_allclose(np.sort(got.scores), np.sort(ref_scores), rtol=1e-4, atol=1e-5)
        iou = mask_iou_matrix(got.masks, ref_masks)
        assert np.all(iou.max(axis=1) > 0.98)
    assert total > 0  # random weights score ~0.5: there is something to compare

    # SSLM: batched probability equals the single-frame one; components follow from it
    for k, frame in enumerate(frames):
        x = normalize_counts(torch.from_numpy(frame)[None])[:, None]
        with torch.no_grad():
            prob = sslm.peak_probability(x)[0].numpy()
        ref_masks, _ = connected_instances(prob >= predictor.settings.ssl_threshold, min_area=min_area, probability=prob)
        got = result[k].ssl.instances
        assert len(got) == len(ref_masks)
        if len(got):
            assert np.all(mask_iou_matrix(got.masks, ref_masks).max(axis=1) > 0.98)
