"""The ``dipid`` command.

Every subcommand turns dipid's own exceptions into one line on stderr (``dipid: error: ...``,
naming the file, the path inside it and what to do) and a non-zero exit code; a traceback from
the CLI is a bug. Warnings are one line each too (``dipid: warning: ...``).

Each subcommand imports its implementation inside its handler, so ``dipid --help`` and the
parsing of every command load neither torch, h5py nor plotly (``tests/test_architecture.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from dipid import __version__
from dipid.errors import DipidError, DipidWarning, ScanWarning
from dipid.tables import text_table

logger = logging.getLogger("dipid.cli")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------------- commands
def cmd_simulate(args: argparse.Namespace) -> int:
    from dipid.synth import simulate_dataset  # h5py

    written = simulate_dataset(
        args.out, n_scans=args.scans, n_frames=args.frames, seed=args.seed, preset=args.preset, detector=args.detector
    )
    for files in written:
        print(f"{files.nexus}  {files.labels}")
    print(f"wrote {len(written)} scan(s) to {Path(args.out).resolve()}")
    return 0


def cmd_labels_convert(args: argparse.Namespace) -> int:
    from dipid.io.zooniverse import convert_zooniverse  # h5py

    labels = convert_zooniverse(args.csv, args.out)
    print(f"wrote {len(labels)} frames, {labels.n_instances} instances to {args.out}")
    return 0


def _base_weights(value: str) -> str | None:
    return None if value.lower() == "none" else value


def _optional_int(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def _optional_float(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _freeze(value: str) -> str | int:
    return int(value) if value.lstrip("-").isdigit() else value


def cmd_train_tlm(args: argparse.Namespace) -> int:
    from dipid.train.tlm import train_tlm  # torch

    summary = train_tlm(
        train=args.train, val=args.val, out=args.out, base_weights=args.base_weights, freeze=args.freeze,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device, amp=args.amp, seed=args.seed,
        resume=args.resume, steps_per_epoch=args.steps_per_epoch, val_frames=args.val_frames,
        optimizer=args.optimizer, schedule=args.schedule, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        crop_size=args.crop_size, crops_per_frame=args.crops_per_frame, background_crops=args.background_crops,
        rois_per_image=args.rois_per_image,
    )
    print(summary)
    return 0


def cmd_train_sslm(args: argparse.Namespace) -> int:
    from dipid.train.sslm_run import train_sslm  # torch

    summary = train_sslm(  # bad label files fail before the run folder is made
        scans=args.scans, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device,
        seed=args.seed, resume=args.resume, labels=args.labels, steps_per_epoch=args.steps_per_epoch,
        crop=None if args.crop is None else (args.crop, args.crop),
        model_options={} if args.channels is None else {"channels": args.channels},
    )
    print(summary)
    return 0


def _load_predictor_for(model: str, weights: str | None, device: str, threshold: float | None):
    from dipid.pipeline import PredictOptions, load_predictor  # h5py (and torch when a model loads)

    return load_predictor(PredictOptions(model=model, weights=weights, device=device, threshold=threshold))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dipid.evaluate import evaluate, load_label_sets  # torch: networks, --tta

    label_sets = load_label_sets(args.data)  # bad labels fail before a model is loaded or a file written
    weights = None if args.model in ("shipped", "default") else args.model
    if args.model == "classical":
        predictor = _load_predictor_for("classical", None, args.device, args.threshold)
        models = ["classical"]
    else:
        predictor = _load_predictor_for("joint", weights, args.device, args.threshold)
        models = [m for m in predictor.available_models if m in (args.models or predictor.available_models)]
    report = evaluate(predictor, label_sets, models=models, tta=args.tta, batch_size=args.batch_size)
    print(report.format_table())
    if args.out:
        report.to_json(args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dipid.pipeline import PredictOptions, process_scans  # h5py (and torch when a model loads)

    options = PredictOptions(model=args.model, weights=args.weights, device=args.device, batch_size=args.batch_size,
                             threshold=args.threshold, overwrite=args.overwrite, viewer=not args.no_viewer,
                             min_frames=args.min_frames)
    if args.model != "classical":
        _load_predictor_for(args.model, args.weights, args.device, args.threshold)  # fail once, early, on missing weights
    with warnings.catch_warnings():
        # each scan's warnings come back in its summary (from Dask workers too) and are printed below
        warnings.simplefilter("ignore", ScanWarning)
        summaries = process_scans(args.scans, args.out, options, workers=args.workers, scheduler=args.scheduler)
    print(_summary_table(summaries))
    for s in summaries:
        for message in s.warnings:
            print(f"dipid: warning: {message}", file=sys.stderr)
    failed = [s for s in summaries if s.status == "failed"]
    for s in failed:
        print(f"dipid: error: {s.error}", file=sys.stderr)
    if failed and len(failed) == len(summaries) and all(s.bad_input for s in failed):
        return EXIT_ERROR  # nothing done, and only because of the input: like any other bad input
    return 1 if failed else 0


def _summary_table(summaries) -> str:

    rows = [[Path(s.scan).name, s.status, s.frames, s.peaks, round(s.seconds, 1)] for s in summaries]
    return text_table(["scan", "status", "frames", "peaks", "seconds"], rows)


def cmd_view(args: argparse.Namespace) -> int:
    from dipid.viz import view_results_file  # plotly, h5py

    out = view_results_file(args.result, args.out)
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dipid.demo import run_demo  # h5py (and torch when weights load)

    report = run_demo(args.out, seed=args.seed, frames=args.frames, device=args.device)
    print(report.format())
    return 0


# --------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="dipid", description="Find and segment diffraction peaks in X-ray detector scans.")
    parser.add_argument("--version", action="version", version=f"dipid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate I16 scans with exact ground truth (NeXus + COCO JSON)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--scans", type=int, default=1, help="number of scans (default 1)")
    p.add_argument("--frames", type=int, default=61, help="frames per scan (default 61)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--preset", default="realistic", help="easy, realistic or hard (default realistic)")
    p.add_argument("--detector", default="pilatus100k", help="pilatus100k or eiger4m (default pilatus100k)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("labels", help="label files")
    labels_sub = p.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    c = labels_sub.add_parser("convert", help="convert a Zooniverse export to COCO JSON")
    c.add_argument("csv", type=Path, help="Zooniverse classification export (.csv)")
    c.add_argument("--out", required=True, type=Path, help="COCO JSON to write")
    c.set_defaults(func=cmd_labels_convert)

    p = sub.add_parser("predict", help="find peaks in scans: <scan>_dipid.nxs, <scan>_peaks.csv, <scan>_view.html")
    p.add_argument("scans", nargs="+", type=Path, metavar="SCAN", help="NeXus/HDF5 scan files")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--model", default="joint", choices=["joint", "tlm", "ssl", "classical"], help="which peaks to report")
    p.add_argument("--weights", default=None, help="checkpoint file or folder (default: the shipped weights/)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per model call (default 8)")
    p.add_argument("--threshold", type=float, default=None, help="TLM confidence threshold (default 0.4)")
    p.add_argument("--overwrite", action="store_true", help="redo scans whose results exist")
    p.add_argument("--no-viewer", action="store_true", help="skip the HTML viewer")
    p.add_argument("--min-frames", type=int, default=2, help="fewest frames a 3D peak must span (default 2)")
    p.add_argument("--workers", type=int, default=0, help="run on a Dask LocalCluster of N worker processes")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (tcp://host:8786)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("view", help="write the HTML viewer of a dipid results file")
    p.add_argument("result", type=Path, help="<scan>_dipid.nxs written by dipid predict")
    p.add_argument("--out", type=Path, default=None, help="HTML file (default: beside the result, _view.html)")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("demo", help="simulate an I16 scan, find its peaks and compare with the truth")
    p.add_argument("--out", type=Path, default=Path("dipid-demo"), help="output folder (default ./dipid-demo)")
    p.add_argument("--seed", type=int, default=7, help="simulation seed (default 7)")
    p.add_argument("--frames", type=int, default=61, help="frames in the scan (default 61)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="score models on labelled scans (COCO JSON)")
    p.add_argument("--model", default="shipped",
                   help="checkpoint file/folder/run folder, 'shipped' (weights/) or 'classical'")
    p.add_argument("--data", required=True, nargs="+", help="COCO JSON file(s) or folder(s) of *_labels.json")
    p.add_argument("--models", nargs="+", default=None, choices=["tlm", "ssl", "joint", "classical"],
                   help="which outputs to score (default all available)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (flips, rot180), merged")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threshold", type=float, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train a model into a resumable run folder")
    train_sub = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    t = train_sub.add_parser("tlm", help="fine-tune / train the Mask R-CNN on labelled frames")
    t.add_argument("--train", required=True, help="COCO JSON, folder of *_labels.json, or sim:realistic,hard[:N]")
    t.add_argument("--val", required=True, help="validation data, same forms as --train")
    t.add_argument("--out", required=True, type=Path, help="run folder")
    t.add_argument("--base-weights", type=_base_weights, default="none", help="coco, a checkpoint path, or none")
    t.add_argument("--freeze", type=_freeze, default="backbone", help="backbone, none, or N trainable stages")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=16, help="crops (or frames) per step (default 16)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-4 for adamw, 0.005 for sgd)")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="default adamw")
    t.add_argument("--schedule", default="cosine", choices=["cosine", "plateau"],
                   help="lr schedule after the warm-up (default cosine over all epochs)")
    t.add_argument("--warmup-steps", type=int, default=200, help="linear lr warm-up steps (default 200)")
    t.add_argument("--ema-decay", type=_optional_float, default=0.999,
                   help="weight EMA that is validated and saved, or 'none' (default 0.999)")
    t.add_argument("--crop-size", type=_optional_int, default=128,
                   help="train on square crops centred on peaks, or 'none' for whole frames (default 128)")
    t.add_argument("--crops-per-frame", type=int, default=4, help="crops cut from each frame (default 4)")
    t.add_argument("--background-crops", type=float, default=0.25,
                   help="share of crops placed anywhere rather than on a peak (default 0.25)")
    t.add_argument("--rois-per-image", type=int, default=32,
                   help="proposals sampled per crop (or frame) to train the heads (default 32)")
    t.add_argument("--device", default="auto")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps-per-epoch", type=int, default=None)
    t.add_argument("--val-frames", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.set_defaults(func=cmd_train_tlm)
    t = train_sub.add_parser("sslm", help="train the self-supervised SSLM on unlabelled scans")
    t.add_argument("--scans", required=True, nargs="+", help="scan files and/or sim:realistic specs")
    t.add_argument("--out", required=True, type=Path, help="run folder")
    t.add_argument("--steps", type=int, default=100,
                   help="optimiser steps (default 100: clusters merge and IoU falls with longer runs; see --labels)")
    t.add_argument("--steps-per-epoch", type=int, default=50, help="steps between validations/checkpoints (default 50)")
    t.add_argument("--crop", type=_optional_int, default=128,
                   help="train on square random windows of this size, or 'none' for whole frames (default 128)")
    t.add_argument("--channels", type=int, default=None, help="clustering channels (default: the model's, 32)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--labels", default=None,
                   help="COCO JSON of a few labelled frames: validation IoU picks the best epoch (recommended)")
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=cmd_train_sslm)
    return parser


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # a failed scan is logged by the pipeline and printed by cmd_predict from its summary: once is enough
    handler.addFilter(lambda record: not getattr(record, "in_summary", False))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[handler],
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """warnings.showwarning for the CLI: one line on stderr, no source line."""

    if issubclass(category, DipidWarning):
        text = f"dipid: warning: {message}"
    else:
        text = f"dipid: warning: {category.__name__}: {message} ({filename}:{lineno})"
    print(" ".join(text.splitlines()), file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dipid`` console script; returns the exit code."""

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _configure_logging(args.verbose)
        func: Callable[[argparse.Namespace], int] = args.func
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return func(args)
    except DipidError as exc:
        print(f"dipid: error: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc.__cause__, KeyboardInterrupt) else EXIT_ERROR
    except KeyboardInterrupt:
        print("dipid: interrupted; finished outputs are kept, run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        # Disk full, permission denied, unwritable output folder: the user's to fix, not a bug.
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"dipid: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
