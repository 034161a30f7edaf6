"""Generalisation: every model on scene families that training never sees, beside the test set.

The shipped models are judged on scans from an independent simulator. This benchmark measures
the same kind of shift with dipid's own simulator: each *family* below takes a preset and moves
some of its distributions outside the ranges any training preset draws from (steeper and
brighter backgrounds, fainter peaks, thinner streaks, more crowded frames). Training recipes
never use these families, so a model that learned the presets' quirks rather than what a peak
is falls behind the classical finder here.

Each family gets its own scans (seeds from ``SHIFT_SEED``), written once under ``--data``. The
table is the same as ``benchmarks/accuracy.py``'s, one block per family.

    python benchmarks/shifted.py --weights weights                 # all families
    python benchmarks/shifted.py --weights weights --families faint --scans 3 --frames 31
    python benchmarks/shifted.py --weights weights --models joint --set peak_windows=32
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

#: Base seed of the shifted scans (the test set uses accuracy.TEST_SEED, training other seeds).
SHIFT_SEED = 20_261_129


def families() -> dict[str, object]:
    """name -> ScanPreset: presets with distributions moved outside every training preset's range."""
    from dipid.synth.presets import PRESETS, Choice, IntRange, LogUniform, Uniform

    realistic, hard = PRESETS["realistic"], PRESETS["hard"]
    return {
        # training gradients reach 1.0 and backgrounds 30 counts; here 1.2-2.5 and 30-120
        "steep-background": replace(hard, gradient=Uniform(1.2, 2.5), background=LogUniform(30.0, 120.0),
                                    peak_counts=LogUniform(200.0, 2e4)),
        # training peaks start at 15 counts but are mostly far brighter; here all within 8-150
        "faint": replace(realistic, peak_counts=LogUniform(8.0, 150.0), background=LogUniform(0.2, 5.0)),
        # only streaks and split peaks, thinner than any training aspect ratio (>= 0.25)
        "thin-streaks": replace(realistic, kind=Choice(("streak", "split"), (0.6, 0.4)), aspect=Uniform(0.1, 0.25)),
        # up to 14 reflections, 12 visible at once (training: 8)
        "crowded": replace(realistic, n_reflections=IntRange(10, 14), max_per_frame=12),
    }


def build_family_set(folder: Path, name: str, preset: object, *, n_scans: int, n_frames: int) -> list[Path]:
    """Write (once) and return the label files of one family's scans."""
    from dipid.synth import presets as preset_module
    from dipid.synth import scan_seed, simulate_scan

    folder.mkdir(parents=True, exist_ok=True)
    key = f"shifted-{name}"
    preset_module.PRESETS[key] = preset  # registered in this process only, for simulate_scan's lookup
    labels = []
    for k in range(n_scans):
        json_path = folder / f"{name}_{k:02d}_labels.json"
        if not json_path.exists():
            seed = scan_seed(SHIFT_SEED + sorted(families()).index(name), k)
            simulate_scan(n_frames=n_frames, preset=key, seed=seed).write(folder, f"{name}_{k:02d}")
        labels.append(json_path)
    return labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(".cache/dipid-shifted"))
    parser.add_argument("--weights", default=None, help="checkpoint file/folder (default: shipped weights/)")
    parser.add_argument("--families", nargs="+", default=None, help=f"subset of {sorted(families())}")
    parser.add_argument("--scans", type=int, default=3)
    parser.add_argument("--frames", type=int, default=31)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=None, help="score only these (default: every model available)")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                        help="change predictor settings from the weights' settings.json (VALUE as JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from accuracy import apply_settings

    from dipid.errors import UnknownNameError, WeightsNotFoundError
    from dipid.evaluate import evaluate
    from dipid.predict import JointPredictor

    table = families()
    chosen = args.families or sorted(table)
    for name in chosen:
        if name not in table:
            raise UnknownNameError("family", name, sorted(table))
    try:
        predictor = JointPredictor.from_pretrained(args.weights, device=args.device)
        models = list(predictor.available_models)
    except WeightsNotFoundError as exc:
        print(f"no trained weights ({exc}); evaluating the classical baseline only", file=sys.stderr)
        predictor, models = JointPredictor(device=args.device), ["classical"]
    predictor = apply_settings(predictor, args.set)
    models = args.models or models

    cols = ("mean_iou", "precision", "recall", "f1", "AP", "fp_area_per_empty_frame")
    print(f"\nshifted families, {args.scans} scans x {args.frames} frames each; device {args.device}; "
          f"{os.cpu_count()} CPU cores ({platform.machine()})\n")
    header = f"{'family':18s}{'model':11s}" + "".join(f"{c[:11]:>12s}" for c in cols)
    print(header)
    print("-" * len(header))
    for name in chosen:
        labels = build_family_set(args.data / f"{name}-{args.scans}x{args.frames}", name, table[name],
                                  n_scans=args.scans, n_frames=args.frames)
        report = evaluate(predictor, labels, models=models, batch_size=args.batch_size, progress=False)
        for model, row in report.summary.items():
            print(f"{name:18s}{model:11s}" + "".join(f"{row.get(c, float('nan')):12.3f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
