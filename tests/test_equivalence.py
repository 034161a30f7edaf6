"""The optimised pipeline gives the same instances as the plain one-frame-at-a-time path.

Optimised means: frames batched and read ahead, the confidence threshold applied inside the
network, BatchNorm folded into convolutions and channels-last weights (dipid.models.inference).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from dipid.io import open_scan
from dipid.metrics import mask_iou_matrix
from dipid.models import build_sslm, build_tlm
from dipid.models.inference import fold_batchnorm, inference_copy
from dipid.models.normalize import normalize_counts
from dipid.models.sslm import assign_channels
from dipid.postprocess import connected_instances
from dipid.predict import JointPredictor, PredictorSettings
from dipid.synth import simulate_scan

NORMS = (torch.nn.BatchNorm2d, FrozenBatchNorm2d)


def randomise_norms(model: torch.nn.Module, seed: int) -> int:
    """Give every BatchNorm non-trivial statistics and affine terms (a fresh one is the identity,
    which folding would reproduce even if the folding maths were wrong)."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS):
                n = m.weight.numel()
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.6 + torch.rand(n, generator=g))
                m.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
                m.bias.copy_(0.05 * torch.randn(n, generator=g))
                count += 1
    return count


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
    assert randomise_norms(tlm, 1) > 50 and randomise_norms(sslm, 2) == 3
    sim = simulate_scan(n_frames=5, preset="realistic", seed=21)
    path = sim.write(tmp_path_factory.mktemp("eq"), "eq").nexus
    with open_scan(path) as scan:
        # roles given here, as training stores them: the predictor never writes into the model it is given
        assign_channels(sslm, normalize_counts(torch.from_numpy(scan[0:3]))[:, None])
    return tlm, sslm, path


def test_batched_pipeline_matches_single_frame_path(setup):
    tlm, sslm, path = setup
    threshold, min_area = 0.45, 4
    reference_heads_thresh = tlm.net.roi_heads.score_thresh
    reference_state = {k: v.clone() for k, v in tlm.state_dict().items()}
    with open_scan(path) as scan:
        frames = [scan[i] for i in range(len(scan))]
    reference = [reference_tlm(tlm, f, threshold, min_area) for f in frames]
    predictor = JointPredictor(tlm=tlm, sslm=sslm, threshold=threshold, device="cpu")
    run = predictor._tlm_run
    assert run.net.roi_heads.score_thresh > reference_heads_thresh  # the optimisations are on
    assert not any(isinstance(m, NORMS) for m in run.modules())
    assert next(run.net.backbone.body.layer1.parameters()).is_contiguous(memory_format=torch.channels_last)
    # ... on the predictor's copy: the model it was given is untouched
    assert tlm.net.roi_heads.score_thresh == reference_heads_thresh
    assert all(torch.equal(v, reference_state[k]) for k, v in tlm.state_dict().items())
    result = predictor.predict_scan(path, batch_size=3)
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


def test_fold_batchnorm_is_exact_in_eval_mode():
    torch.manual_seed(0)
    block = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(), torch.nn.BatchNorm2d(8),  # after a ReLU: must stay
        torch.nn.Conv2d(8, 4, 1), FrozenBatchNorm2d(4, eps=1e-5),
    )
    randomise_norms(block, 3)
    x = torch.randn(2, 3, 9, 11)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(block)
    block.eval()
    expected = block(x)
    fast = inference_copy(block)
    assert sum(isinstance(m, NORMS) for m in fast.modules()) == 1  # only the one after the ReLU
    assert isinstance(fast[3], torch.nn.BatchNorm2d)
    torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-5)
    # the original is not modified
    assert sum(isinstance(m, NORMS) for m in block.modules()) == 3
    torch.testing.assert_close(block(x), expected)


def test_tlm_and_sslm_inference_copies_match(setup):
    tlm, sslm, _ = setup
    torch.manual_seed(5)
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        plain = tlm.net.backbone(x)
        fast = inference_copy(tlm).net.backbone(x)
        for level in plain:
            assert fast[level].is_contiguous()  # RoIAlign's fast layout
            torch.testing.assert_close(fast[level], plain[level], rtol=1e-4, atol=1e-4 * plain[level].abs().max().item())
        torch.testing.assert_close(inference_copy(sslm)(x), sslm(x), rtol=1e-4, atol=1e-5)


def test_proposals_setting_changes_only_the_predictor_copy(setup):
    tlm, _, _ = setup
    own = tlm.net.rpn.post_nms_top_n()
    predictor = JointPredictor(tlm=tlm, device="cpu", settings=PredictorSettings(proposals=50))
    assert predictor._tlm_run.net.rpn.post_nms_top_n() == 50
    assert tlm.net.rpn.post_nms_top_n() == own == 1000
    x = normalize_counts(torch.rand(1, 64, 96) * 100)[:, None]
    with torch.no_grad():
        images, _ = predictor._tlm_run.net.transform(list(x.unbind(0)))
        features = predictor._tlm_run.net.backbone(images.tensors)
        proposals, _ = predictor._tlm_run.net.rpn(images, features)
    assert len(proposals[0]) <= 50
