"""Each script in examples/ runs on simulated data (small sizes) and produces its outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_examples_have_header_comments():
    scripts = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
    assert len(scripts) == 4
    for script in scripts:
        assert script.read_text().startswith('"""'), f"{script.name} has no header docstring"


def test_predict_one_image(tmp_path):
    proc = run_example("predict_one_image.py", "--frame", "30", "--out", "f.html", cwd=tmp_path)
    assert "joint :" in proc.stdout
    assert (tmp_path / "f.html").stat().st_size > 100_000


def test_predict_scan_3d(tmp_path):
    run_example("predict_scan_3d.py", "--frames", "6", "--out-dir", "res", cwd=tmp_path)
    for name in ("volume_3d.html", "results.nxs", "viewer.html"):
        assert (tmp_path / "res" / name).is_file()


def test_evaluate_model(tmp_path):
    proc = run_example("evaluate_model.py", "--frames", "5", "--out", "r.json", cwd=tmp_path)
    assert "mean_iou" in proc.stdout and "classical" in proc.stdout
    assert (tmp_path / "r.json").is_file()


def test_finetune_tlm(tmp_path):
    proc = run_example("finetune_tlm.py", "--epochs", "1", "--steps-per-epoch", "1", "--val-frames", "2",
                       "--batch-size", "1", "--sim-frames", "4", "--out", "run", cwd=tmp_path)
    assert "fine-tuned model ready" in proc.stdout
    assert (tmp_path / "run" / "best.safetensors").is_file()
    assert (tmp_path / "run" / "history.csv").is_file()
