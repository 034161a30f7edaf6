"""``dipid demo``: the main job on an embedded default.

Simulates a realistic I16 rocking scan (so the truth is known), runs the JointPredictor with the
shipped weights when they exist (else the best model available, saying so), writes the three
outputs of ``dipid predict`` and returns the found 3D peaks next to the true reflections.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dipid.errors import DipidError, WeightsNotFoundError
from dipid.io.results_nexus import read_results_nexus
from dipid.pipeline import PredictOptions, load_predictor, process_scan
from dipid.synth import simulate_scan
from dipid.tables import text_table
from dipid.volume import match_peaks_3d

logger = logging.getLogger(__name__)

__all__ = ["DemoReport", "run_demo"]


@dataclass
class DemoReport:
    """What the demo wrote and found.

    Attributes:
        outputs: nexus / peaks / viewer paths, plus the simulated scan and its labels.
        model: the model that produced the peaks, and why it was chosen.
        comparison: columns, one row per true reflection (matched peak or none) and per false peak.
        recall, precision: 3D peak matching at voxel IoU >= 0.5.
    """

    outputs: dict[str, Path]
    model: str
    comparison: dict[str, list]
    recall: float
    precision: float

    def format(self) -> str:

        cols = list(self.comparison)
        rows = list(zip(*self.comparison.values()))
        lines = [
            f"model: {self.model}",
            text_table(cols, rows),
            f"3D peaks: recall {self.recall:.2f}, precision {self.precision:.2f} (voxel IoU >= 0.5)",
            *(f"{k}: {v}" for k, v in self.outputs.items()),
        ]
        return "\n".join(lines)


def _choose_model(device: str) -> tuple[PredictOptions, str]:
    """(how to predict the demo scan, a sentence saying which model and why)."""
    # torch behind it: imported only when the demo runs
    from dipid.models.weights import DEFAULT_WEIGHTS_DIR  # imports torch: only when weights are looked for

    options = PredictOptions(model="joint", device=device, overwrite=True)
    try:
        predictor = load_predictor(options)  # cached: process_scan reuses it
    except WeightsNotFoundError:
        return replace(options, model="classical"), (
            "classical baseline: no trained weights are shipped in weights/ yet "
            "(train them with `dipid train tlm` / `dipid train sslm`)")
    parts = [name for name, model in (("TLM", predictor.tlm), ("SSLM", predictor.sslm)) if model is not None]
    if predictor.settings.fusion_anchor == "classical":
        return options, (f"joint (the classical finder's peaks, each kept where the {' or '.join(parts)} "
                         f"confirms it; shipped weights in {DEFAULT_WEIGHTS_DIR})")
    if predictor.settings.fusion_classical:
        parts.append("classical finder")
    return options, f"joint ({' + '.join(parts)}, shipped weights in {DEFAULT_WEIGHTS_DIR})"


def run_demo(out: str | Path = "dipid-demo", *, seed: int = 7, frames: int = 61, device: str = "auto") -> DemoReport:
    """Simulate, predict, write ``<scan>_dipid.nxs``, ``<scan>_peaks.csv``, ``<scan>_view.html`` into ``out``."""

    out = Path(out)
    sim = simulate_scan(n_frames=frames, preset="realistic", seed=seed)
    files = sim.write(out, "demo_scan")
    options, why = _choose_model(device)
    logger.info("demo: %s", why)
    summary = process_scan(files.nexus, out, options)
    if summary.status != "done":
        raise DipidError(f"demo failed: {summary.error}")
    results = read_results_nexus(summary.outputs["nexus"])
    truth = sim.truth_volume()
    match = match_peaks_3d(results.peak_labels, truth)
    comparison = _comparison(results, truth, match["matches"])
    return DemoReport(
        outputs={"scan": files.nexus, "labels": files.labels, **{k: Path(v) for k, v in summary.outputs.items()}},
        model=why, comparison=comparison, recall=float(match["recall"]), precision=float(match["precision"]),
    )


def _comparison(results, truth: np.ndarray, matches: np.ndarray) -> dict[str, list]:
    """One row per true reflection with the peak matched to it, then unmatched found peaks."""
    peaks = results.peaks
    axis = results.axis_name
    pred_row = {int(pid): k for k, pid in enumerate(peaks["id"])}
    truth_to_pred = {int(t): int(p) for p, t in np.asarray(matches).reshape(-1, 2)}
    cols: dict[str, list] = {"true id": [], "true frames": [], "true row,col": [], "found id": [], "found frames": [],
                             "found row,col": [], axis: [], "intensity": []}
    for tid in np.unique(truth[truth > 0]):
        f, r, c = np.nonzero(truth == tid)
        cols["true id"].append(int(tid) - 1)
        cols["true frames"].append(f"{f.min()}-{f.max()}")
        cols["true row,col"].append(f"{r.mean():.0f},{c.mean():.0f}")
        _found(cols, peaks, pred_row.get(truth_to_pred.get(int(tid), -1)), axis)
    matched = set(truth_to_pred.values())
    for pid, k in pred_row.items():
        if pid not in matched:
            cols["true id"].append("-")
            cols["true frames"].append("-")
            cols["true row,col"].append("-")
            _found(cols, peaks, k, axis)
    return cols


def _found(cols: dict[str, list], peaks: dict, k: int | None, axis: str) -> None:
    if k is None:
        for name in ("found id", "found frames", "found row,col", axis, "intensity"):
            cols[name].append("missed")
        return
    cols["found id"].append(int(peaks["id"][k]))
    cols["found frames"].append(f"{int(peaks['first_frame'][k])}-{int(peaks['last_frame'][k])}")
    cols["found row,col"].append(f"{float(peaks['centroid_row'][k]):.0f},{float(peaks['centroid_col'][k]):.0f}")
    cols[axis].append(round(float(peaks[axis][k]), 4) if axis in peaks else "-")
    cols["intensity"].append(int(round(float(peaks["intensity"][k]))))
