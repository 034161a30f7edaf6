"""Classical-only prediction and evaluation never import torch or torchvision (issue 14).

`dipid predict --model classical` spent ~4 s of a short scan importing them; each check runs in a
fresh interpreter, where ``sys.modules`` says what was really imported.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

_HEAVY = ("torch", "torchvision")


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout (the test fails with its stderr)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_classical_prediction_imports_no_torch():
    out = _run(f"""
        import sys
        import numpy as np
        import dipid.pipeline, dipid.predict
        from dipid.predict import JointPredictor
        from dipid.pipeline import PredictOptions, load_predictor

        frame = np.random.default_rng(0).poisson(2.0, (48, 40)).astype(np.float32)
        frame[20:23, 10:13] += 400.0
        predictor = load_predictor(PredictOptions(model="classical", device="cpu"))
        assert isinstance(predictor, JointPredictor)
        result = predictor.predict_frames(frame, models="classical")[0]
        one = JointPredictor().predict_one_image(frame[None], 0, models=("joint", "classical"))
        stricter = predictor.with_settings(threshold=0.9)
        params = predictor.parameters_dict()
        print(len(result.classical), len(one.joint), stricter.settings.threshold, params["device"])
        print(sorted(m for m in {_HEAVY!r} if m in sys.modules))
    """)
    found, loaded = out.strip().splitlines()
    peaks, joint, threshold, device = found.split()
    assert int(peaks) >= 1 and int(joint) == int(peaks)  # the bright blob is found; joint is the classical set
    assert float(threshold) == 0.9 and device == "cpu"
    assert loaded == "[]", f"classical-only prediction imported {loaded}"


def test_device_of_a_classical_predictor_resolves_on_demand():
    out = _run(f"""
        import sys
        from dipid.predict import JointPredictor
        predictor = JointPredictor(device="cpu")
        before = sorted(m for m in {_HEAVY!r} if m in sys.modules)
        print(before, predictor.device.type, "torch" in sys.modules)
    """)
    assert out.split() == ["[]", "cpu", "True"]


def test_numpy_and_tensor_inputs_give_the_same_classical_peaks():
    from dipid.predict import JointPredictor

    rng = np.random.default_rng(1)
    frames = rng.poisson(2.0, (2, 40, 40)).astype(np.float32)
    frames[0, 5:8, 5:8] += 300.0
    frames[1, 30:34, 20:23] += 500.0
    predictor = JointPredictor(device="cpu")
    from_numpy = predictor.predict_frames(frames, models="classical")
    from_tensor = predictor.predict_frames(torch.from_numpy(frames.copy()), models="classical")
    for a, b in zip(from_numpy, from_tensor):
        assert len(a.classical) >= 1
        np.testing.assert_array_equal(a.classical.masks, b.classical.masks)
        np.testing.assert_array_equal(a.classical.scores, b.classical.scores)


def test_classical_evaluation_imports_no_torch(tmp_path):
    from dipid.synth import simulate_scan

    simulate_scan(n_frames=4, preset="easy", seed=5).write(tmp_path, "light")
    out = _run(f"""
        import sys
        from dipid.cli import main
        code = main(["evaluate", "--data", {str(tmp_path / "light_labels.json")!r}, "--model", "classical"])
        print(code, sorted(m for m in {_HEAVY!r} if m in sys.modules))
    """)
    code, loaded = out.strip().splitlines()[-1].split(" ", 1)
    assert code == "0"  # the table was printed above
    assert loaded == "[]", f"classical-only evaluation imported {loaded}"
