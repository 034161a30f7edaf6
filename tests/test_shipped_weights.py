"""The weights shipped in weights/: they load, match SHA256SUMS and find the true peaks of simulated frames.

Bounds that missing, damaged or untrained weights fail: without weights ``from_pretrained``
raises; an untrained Mask R-CNN scores every proposal about 0.5 and finds no peak at the shipped
threshold, so the TLM's own recall bound fails; and `joint` must keep the true peaks the
classical finder finds (its networks confirm them) while matching its IoU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dipid.io import fill_bad_pixels
from dipid.metrics import evaluate_frames
from dipid.models.weights import DEFAULT_WEIGHTS_DIR
from dipid.predict import JointPredictor
from dipid.synth import simulate_scan


@pytest.fixture(scope="module")
def shipped() -> JointPredictor:
    return JointPredictor.from_pretrained(device="cpu")  # verifies weights/SHA256SUMS


def test_shipped_weights_are_small_complete_and_carry_their_fusion_rule(shipped):
    assert shipped.tlm is not None and shipped.sslm is not None
    for name in ("tlm.safetensors", "sslm.safetensors", "settings.json", "SHA256SUMS", "README.md"):
        path = DEFAULT_WEIGHTS_DIR / name
        assert path.is_file(), name
        assert path.stat().st_size < 50e6, name
    rule = json.loads((DEFAULT_WEIGHTS_DIR / "settings.json").read_text())
    assert {name: getattr(shipped.settings, name) for name in rule} == rule


@pytest.mark.parametrize("preset,seed", [("easy", 101), ("realistic", 202)])
def test_shipped_models_find_the_true_peaks_of_simulated_frames(shipped, preset, seed):
    sim = simulate_scan(n_frames=12, preset=preset, seed=seed)
    bad = sim.bad_pixels
    counts = fill_bad_pixels(sim.frames, bad).astype(np.float32)
    # the gate off: the TLM's own recall is asserted, so it must see every frame
    results = shipped.with_settings(classical_gate=False).predict_frames(
        counts, bad_pixels=bad, keep_probability=False, models=("tlm", "ssl", "classical"))
    truth = [fl.masks() for fl in sim.labels]
    valid = [~np.asarray(b) for b in (bad if np.ndim(bad) == 3 else [bad] * len(truth))]
    assert sum(len(t) for t in truth) > 0

    def score(model: str) -> dict[str, float]:
        found = [r.instances(model) for r in results]
        return evaluate_frames(truth, [(f.masks, f.scores) for f in found], valid=valid)

    tlm, joint, classical = score("tlm"), score("joint"), score("classical")
    assert tlm["recall"] >= 0.6, tlm  # the TLM alone, at the shipped threshold: trained weights
    assert joint["recall"] >= 0.7 and joint["precision"] >= 0.5, joint
    assert joint["mean_iou"] >= 0.6 and joint["mean_iou"] >= classical["mean_iou"] - 0.05, (joint, classical)


def test_shipped_gate_skips_frames_without_classical_peaks_and_leaves_joint_unchanged(shipped):
    assert shipped.settings.classical_gate
    sim = simulate_scan(n_frames=12, preset="realistic", seed=202)
    bad = sim.bad_pixels
    counts = fill_bad_pixels(sim.frames, bad).astype(np.float32)
    gated = shipped.predict_frames(counts, bad_pixels=bad, keep_probability=False)
    full = shipped.with_settings(classical_gate=False).predict_frames(counts, bad_pixels=bad, keep_probability=False)
    ran = [r.has("tlm") for r in gated]
    assert any(ran) and not all(ran)  # some frames are skipped, not all
    for cut, whole in zip(gated, full):
        np.testing.assert_array_equal(cut.joint.label_image(), whole.joint.label_image())
        np.testing.assert_allclose(cut.joint.scores, whole.joint.scores)


def test_evaluate_scores_the_networks_on_every_frame_even_with_the_gate(shipped, tmp_path):
    from dipid.evaluate import evaluate

    simulate_scan(n_frames=12, preset="realistic", seed=202).write(tmp_path, "gate")
    labels = tmp_path / "gate_labels.json"
    gated = evaluate(shipped, labels, models=["tlm", "joint"], progress=False, coco_ap=False)
    plain = evaluate(shipped.with_settings(classical_gate=False), labels, models=["tlm", "joint"], progress=False,
                     coco_ap=False)
    assert gated.settings["parameters"]["classical_gate"] is False
    for model in ("tlm", "joint"):
        for metric in ("mean_iou", "f1", "precision", "recall"):
            assert gated.summary[model][metric] == pytest.approx(plain.summary[model][metric], nan_ok=True)
