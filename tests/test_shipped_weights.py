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

#: settings that run the networks on every whole frame (the shipped gate and peak windows off)
WHOLE_FRAMES = dict(classical_gate=False, peak_windows=None)


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
    results = shipped.with_settings(**WHOLE_FRAMES).predict_frames(
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
    gated = shipped.with_settings(peak_windows=None).predict_frames(counts, bad_pixels=bad, keep_probability=False)
    full = shipped.with_settings(**WHOLE_FRAMES).predict_frames(counts, bad_pixels=bad, keep_probability=False)
    ran = [r.has("tlm") for r in gated]
    assert any(ran) and not all(ran)  # some frames are skipped, not all
    for cut, whole in zip(gated, full):
        np.testing.assert_array_equal(cut.joint.label_image(), whole.joint.label_image())
        np.testing.assert_allclose(cut.joint.scores, whole.joint.scores)


def test_shipped_peak_windows_keep_joint_as_good_as_on_whole_frames(shipped):
    margin = shipped.settings.peak_windows if shipped.settings.peak_windows is not None else 32
    sim = simulate_scan(n_frames=12, preset="realistic", seed=202)
    bad = sim.bad_pixels
    counts = fill_bad_pixels(sim.frames, bad).astype(np.float32)
    truth = [fl.masks() for fl in sim.labels]
    valid = [~np.asarray(b) for b in (bad if np.ndim(bad) == 3 else [bad] * len(truth))]
    scores = {}
    for name, predictor in (("whole", shipped.with_settings(peak_windows=None)),
                            ("windows", shipped.with_settings(peak_windows=margin))):
        joint = [r.joint for r in predictor.predict_frames(counts, bad_pixels=bad, keep_probability=False,
                                                           models="joint")]
        scores[name] = evaluate_frames(truth, [(j.masks, j.scores) for j in joint], valid=valid)
    assert scores["whole"]["recall"] >= 0.7  # the bound below compares two working predictions
    assert scores["windows"]["mean_iou"] >= scores["whole"]["mean_iou"] - 0.01, scores
    assert scores["windows"]["f1"] >= scores["whole"]["f1"] - 0.05, scores


def test_evaluate_scores_the_networks_on_every_frame_even_with_the_gate(shipped, tmp_path):
    from dipid.evaluate import evaluate

    simulate_scan(n_frames=12, preset="realistic", seed=202).write(tmp_path, "gate")
    labels = tmp_path / "gate_labels.json"
    windowed = shipped.with_settings(peak_windows=16)  # changes joint a little: scored as it runs
    for predictor in (shipped.with_settings(peak_windows=None), windowed):
        report = evaluate(predictor, labels, models=["tlm", "joint"], progress=False, coco_ap=False)
        networks = evaluate(predictor.with_settings(**WHOLE_FRAMES), labels, models=["tlm"], progress=False,
                            coco_ap=False)
        joint = evaluate(predictor, labels, models=["joint"], progress=False, coco_ap=False)
        assert report.settings["parameters"]["classical_gate"] is True
        assert report.settings["whole_frame_models"] == (["tlm"] if predictor is windowed else ["tlm", "joint"])
        for metric in ("mean_iou", "f1", "precision", "recall"):
            assert report.summary["tlm"][metric] == pytest.approx(networks.summary["tlm"][metric], nan_ok=True)
            assert report.summary["joint"][metric] == pytest.approx(joint.summary["joint"][metric], nan_ok=True)
