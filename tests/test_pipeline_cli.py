"""`dipid predict`, `dipid view`, `dipid simulate`, `dipid demo` and the Dask path, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dipid.cli import main
from dipid.io.results_nexus import read_results_nexus
from dipid.pipeline import PredictOptions, output_paths, process_scan, process_scans
from dipid.synth import simulate_scan


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("scans")
    return [simulate_scan(n_frames=8, preset="easy", seed=s).write(folder, f"scan{s}").nexus for s in (1, 2)]


def test_predict_classical_writes_three_outputs_and_skips_finished(scans, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", *map(str, scans), "--out", str(out), "--model", "classical"]) == 0
    table = capsys.readouterr().out
    assert "scan1.nxs" in table and "done" in table
    for scan in scans:
        paths = output_paths(scan, out)
        assert all(p.is_file() for p in paths.values())
        res = read_results_nexus(paths["nexus"])
        assert res.peak_labels.shape == (8, 195, 487)
        assert res.parameters["model"] == "classical"
        csv_lines = paths["peaks"].read_text().splitlines()
        assert csv_lines[0].startswith("id,") and len(csv_lines) - 1 == len(res.peaks["id"])
        assert "plotly" in paths["viewer"].read_text()[:200000].lower()
    before = output_paths(scans[0], out)["nexus"].stat().st_mtime_ns
    assert main(["predict", str(scans[0]), "--out", str(out), "--model", "classical"]) == 0
    assert "skipped" in capsys.readouterr().out
    assert output_paths(scans[0], out)["nexus"].stat().st_mtime_ns == before


def test_predict_reports_bad_scan_and_processes_the_rest(scans, tmp_path, capsys):
    bad = tmp_path / "broken.nxs"
    bad.write_bytes(b"not hdf5 at all")
    rc = main(["predict", str(bad), str(scans[0]), "--out", str(tmp_path / "o"), "--model", "classical", "--no-viewer"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.nxs" in captured.err and "Traceback" not in captured.err
    assert output_paths(scans[0], tmp_path / "o")["nexus"].is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.nxs"), "--out", str(tmp_path), "--model", "tlm",
                 "--weights", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dipid: error:") and "dipid train tlm" in err[0]
    assert main(["simulate", "--out", str(tmp_path), "--preset", "nope"]) == 2
    assert "realistic" in capsys.readouterr().err


def test_view_command_rebuilds_viewer(scans, tmp_path):
    out = tmp_path / "v"
    summary = process_scan(scans[1], out, PredictOptions(model="classical", viewer=False))
    assert summary.status == "done"
    html = out / "custom.html"
    assert main(["view", summary.outputs["nexus"], "--out", str(html)]) == 0
    assert html.stat().st_size > 100_000


def test_simulate_command(tmp_path):
    assert main(["simulate", "--out", str(tmp_path), "--scans", "2", "--frames", "5", "--seed", "4"]) == 0
    nxs = sorted(tmp_path.glob("*.nxs"))
    assert len(nxs) == 2
    with h5py.File(nxs[0]) as f:
        assert f["entry/instrument/pil3_100k/data"].shape == (5, 195, 487)
    assert len(json.loads(sorted(tmp_path.glob("*_labels.json"))[0].read_text())["images"]) == 5


def test_demo_runs_and_compares_with_truth(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--frames", "21"]) == 0
    out = capsys.readouterr().out
    assert "true id" in out and "recall" in out
    assert (tmp_path / "demo" / "demo_scan_dipid.nxs").is_file()
    assert (tmp_path / "demo" / "demo_scan_view.html").is_file()


def test_dask_local_cluster_matches_single_process(scans, tmp_path):
    single = process_scans(scans, tmp_path / "single", PredictOptions(model="classical", viewer=False), progress=False)
    on_dask = process_scans(scans, tmp_path / "dask", PredictOptions(model="classical", viewer=False), workers=2,
                            progress=False)
    assert [s.status for s in single] == [s.status for s in on_dask] == ["done", "done"]
    for scan in scans:
        a = read_results_nexus(output_paths(scan, tmp_path / "single")["nexus"])
        b = read_results_nexus(output_paths(scan, tmp_path / "dask")["nexus"])
        np.testing.assert_array_equal(a.peak_labels, b.peak_labels)
        assert list(a.peaks["id"]) == list(b.peaks["id"])
        np.testing.assert_allclose(a.peaks["intensity"], b.peaks["intensity"])


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dipid.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("dipid ")


def test_evaluate_command_writes_report(scans, tmp_path, capsys):
    labels = [str(Path(s).with_name(Path(s).stem + "_labels.json")) for s in scans]
    report = tmp_path / "report.json"
    assert main(["evaluate", "--model", "classical", "--data", *labels, "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert "classical" in out and "mean_iou" in out and "scan1.nxs" in out
    doc = json.loads(report.read_text())
    summary = doc["summary"]["classical"]
    assert 0.0 <= summary["mean_iou"] <= 1.0 and summary["n_frames"] == 16
    assert set(doc["per_scan"]["classical"]) == {"scan1.nxs", "scan2.nxs"}


def test_evaluate_groups_score_subsets_of_the_same_predictions(scans):
    from dipid.evaluate import evaluate
    from dipid.predict import JointPredictor

    labels = [Path(s).with_name(Path(s).stem + "_labels.json") for s in scans]
    predictor = JointPredictor(device="cpu")
    grouped = evaluate(predictor, labels, models=["classical"], progress=False,
                       group_of=lambda scan: Path(scan).stem)  # one group per scan
    groups = grouped.per_group["classical"]
    assert set(groups) == {"scan1", "scan2"}
    for name in ("scan1", "scan2"):
        alone = evaluate(predictor, [labels[int(name[-1]) - 1]], models=["classical"], progress=False)
        for metric in ("mean_iou", "f1", "AP"):
            assert groups[name][metric] == pytest.approx(alone.summary["classical"][metric], nan_ok=True)
    plain = evaluate(predictor, labels, models=["classical"], progress=False)
    untimed = lambda summary: {k: v for k, v in summary["classical"].items() if k != "frames_per_s"}  # noqa: E731
    assert untimed(grouped.summary) == untimed(plain.summary)
    assert plain.per_group == {}


def test_predict_never_reads_the_whole_scan_into_memory(scans, tmp_path, monkeypatch):
    """Bounded memory: the peak table and the viewer re-read the scan a batch or a frame at a time."""
    from dipid.io import Scan
    from dipid.results import ScanResult
    from dipid.volume import Peaks3D

    def whole_scan(*args, **kwargs):
        raise AssertionError("the pipeline read every frame of the scan into one array")

    monkeypatch.setattr(ScanResult, "read_counts", whole_scan)
    monkeypatch.setattr(ScanResult, "label_volume", whole_scan)
    monkeypatch.setattr(Peaks3D, "labels", property(whole_scan))
    monkeypatch.setattr(Scan, "read_frames", whole_scan)
    summary = process_scan(scans[0], tmp_path, PredictOptions(model="classical"))
    assert summary.status == "done", summary.error
    assert all(Path(p).is_file() for p in summary.outputs.values())
