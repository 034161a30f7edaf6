"""Scan workflow: one scan in, its results file, peak table and viewer out; many scans, locally or on Dask.

For each scan ``<stem>.nxs`` the outputs are ``<stem>_peaks.csv``, ``<stem>_view.html`` and
``<stem>_dipid.nxs``. Each is written to a temporary name and renamed; the NeXus file is written
last, so its presence marks a finished scan: an interrupted run loses nothing that was finished,
and the next run skips it. A scan that fails leaves none of its outputs behind (those written
before the failure are removed). The scan's warnings (:class:`dipid.errors.ScanWarning`: NaN
pixels, frames never written, ...) are kept in its :class:`ScanSummary`.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dipid import __version__
from dipid.cluster import run_on_dask
from dipid.errors import DipidError, UnknownNameError
from dipid.io import open_scan
from dipid.io.results_nexus import write_results_nexus
from dipid.volume import instance_label_frames, scan_peaks

logger = logging.getLogger(__name__)

__all__ = ["PIPELINE_MODELS", "PredictOptions", "ScanSummary", "output_paths", "process_scan", "process_scans", "load_predictor"]

#: What ``dipid predict --model`` accepts.
PIPELINE_MODELS = ("joint", "tlm", "ssl", "classical")

#: Memory for a scan's frames between its passes (prediction, peak table, viewer): each frame is
#: decompressed once and kept packed (see :func:`dipid.io.open_scan`); frames past this budget are
#: read from the file again. 200 frames of a simulated Eiger 4M scan take about 0.9 GB.
SCAN_CACHE_BYTES = 1 << 30
#: Most bytes of frames (as float32) read at once where frames are worked on one at a time (the
#: classical finder, the peak table). Larger arrays are mapped fresh from the system for every
#: batch, page faults and all: 8 Eiger 4M frames are 143 MB, and reading 200 of them a frame at a
#: time instead took 4 s less of system time and 0.25 GB less memory.
READ_BYTES = 32 << 20


@dataclass(frozen=True)
class PredictOptions:
    """How to predict a scan; hashable so a worker builds its predictor once per option set.

    Attributes:
        model: which instance set defines the peaks: joint, tlm, ssl or classical.
        weights: checkpoint file or folder; None = the shipped ``weights/``.
        device: "auto", "cpu", "cuda", ...
        batch_size: frames per model call.
        threshold: TLM confidence threshold (None = the predictor's default).
        overwrite: redo scans whose results already exist.
        viewer: also write the HTML viewer.
        min_frames: fewest consecutive frames a 3D peak must span (a reflection crossing the Ewald
            sphere in a rocking scan spans several; single-frame blobs are mostly noise or zingers).
    """

    model: str = "joint"
    weights: str | None = None
    device: str = "auto"
    batch_size: int = 8
    threshold: float | None = None
    overwrite: bool = False
    viewer: bool = True
    min_frames: int = 2

    def __post_init__(self) -> None:
        if self.model not in PIPELINE_MODELS:
            raise UnknownNameError("model", self.model, PIPELINE_MODELS)


@dataclass
class ScanSummary:
    """One row of the summary table of a `dipid predict` run."""

    scan: str
    status: str  # "done", "skipped" or "failed"
    frames: int = 0
    peaks: int = 0
    seconds: float = 0.0
    error: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    #: the scan's warnings (one line each), also for scans run on Dask workers
    warnings: list[str] = field(default_factory=list)
    #: the failure is the input's fault (a dipid error: bad file, nothing measurable), not a bug
    bad_input: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_paths(scan_path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """The three result files of a scan: nexus, peaks (CSV) and viewer (HTML)."""
    stem = Path(scan_path).stem
    out = Path(out_dir)
    return {"nexus": out / f"{stem}_dipid.nxs", "peaks": out / f"{stem}_peaks.csv", "viewer": out / f"{stem}_view.html"}


@functools.lru_cache(maxsize=4)
def load_predictor(options: PredictOptions):
    """Build (once per process and option set) the predictor ``options`` asks for."""
    # only where scans are predicted (and torch only when weights load): the Dask client stays light
    from dipid.predict import JointPredictor

    kwargs: dict[str, Any] = {"device": options.device}
    if options.threshold is not None:
        kwargs["threshold"] = options.threshold
    if options.model == "classical":
        return JointPredictor(**kwargs)
    return JointPredictor.from_pretrained(options.weights, **kwargs)


def process_scan(scan_path: str | Path, out_dir: str | Path, options: PredictOptions = PredictOptions()) -> ScanSummary:
    """Predict one scan and write its three outputs. Never raises for a bad scan: the summary says why.

    The networks take ``options.batch_size`` frames per call; the classical finder and the peak
    table, which work a frame at a time, get frames in batches of at most :data:`READ_BYTES`.
    """
    scan_path = Path(scan_path)
    paths = output_paths(scan_path, out_dir)
    summary = ScanSummary(scan=str(scan_path), status="done", outputs={k: str(v) for k, v in paths.items()})
    if paths["nexus"].exists() and not options.overwrite:
        summary.status = "skipped"
        return summary
    started = time.perf_counter()
    scan = None
    written: list[Path] = []
    try:
        predictor = load_predictor(options)
        scan = open_scan(scan_path, cache_bytes=SCAN_CACHE_BYTES)
        with scan:
            # Bounded memory: the result holds cropped instances only; the peak table and the
            # viewer re-read the counts from the scan a batch (or a shown frame) at a time, from
            # the frames it keeps (packed, up to SCAN_CACHE_BYTES) or else from the file.
            # "joint" runs both networks, the others the one model named (see dipid.predict.select_models)
            frame_bytes = 4 * scan.frame_shape[0] * scan.frame_shape[1]
            per_read = max(1, min(options.batch_size, READ_BYTES // frame_bytes))
            batch = per_read if options.model == "classical" else options.batch_size
            result = predictor.predict_scan(scan, batch_size=batch, models=options.model)
            peaks = scan_peaks(result, scan=scan, model=options.model, min_frames=options.min_frames,
                               batch_size=per_read)
            # each model's instance label images as their labelled pixels: the viewer draws and
            # the results file stores them without dense frames
            labels = {m: instance_label_frames(result.instances(m), result.frame_shape)
                      for m in result.models_present()}
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            written.append(paths["peaks"])
            peaks.to_csv(paths["peaks"])
            if options.viewer:
                from dipid.viz import view_scan_result  # plotly, only when a viewer is asked for

                written.append(paths["viewer"])
                view_scan_result(result, scan, paths["viewer"], peak_table=peaks, label_volumes=labels)
        write_results_nexus(
            paths["nexus"], result, peaks=peaks, software_version=__version__,
            model_names=result.metadata.get("models", []), weights_sha256={
                k: v.get("sha256", "") for k, v in predictor.weights_info.items()},
            parameters={**predictor.parameters_dict(), **asdict(options)}, label_frames=labels,
        )
        summary.frames, summary.peaks = len(result), len(peaks)
    except DipidError as exc:
        summary.status, summary.error, summary.bad_input = "failed", str(exc), True
    except Exception as exc:  # one broken scan must not stop the others; the log keeps the traceback
        logger.debug("scan %s failed:\n%s", scan_path, traceback.format_exc())
        summary.status, summary.error = "failed", f"{scan_path}: {type(exc).__name__}: {exc}"
    if scan is not None:
        summary.warnings = [str(w) for w in scan.warnings]
    summary.seconds = time.perf_counter() - started
    if summary.status == "failed":
        for path in written:  # no half set of results: the NeXus file (written last) marks a finished scan
            path.unlink(missing_ok=True)
        # in_summary: the CLI prints the summary's error itself, and drops this record
        logger.error("%s", summary.error, extra={"in_summary": True})
    return summary


def process_scans(
    scans: Sequence[str | Path],
    out_dir: str | Path,
    options: PredictOptions = PredictOptions(),
    *,
    workers: int = 0,
    scheduler: str | None = None,
    progress: bool = True,
) -> list[ScanSummary]:
    """Process many scans: in this process (``workers=0``), on a Dask LocalCluster of ``workers``
    processes, or on an existing Dask cluster at ``scheduler`` (e.g. one from dask-jobqueue).
    One task per scan; the workers write the results; a failed scan is reported, the others go on.
    """
    if scheduler is None and workers <= 0:
        from tqdm.auto import tqdm

        return [process_scan(s, out_dir, options) for s in tqdm(list(scans), desc="scans", unit="scan", disable=not progress)]
    return run_on_dask(process_scan, scans, out_dir, options, workers=workers, scheduler=scheduler, progress=progress,
                       failed=lambda scan, error: ScanSummary(scan=scan, status="failed", error=error))
