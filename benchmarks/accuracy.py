"""Accuracy of every model on a fixed simulated test set that training never sees.

The test set: 12 scans of 61 frames (by default), seeded from TEST_SEED (training uses other
seeds), 4 easy, 4 realistic and 4 hard scans, covering weak peaks, streaks, split peaks, powder
rings, dead pixels and attenuator changes. It is written once into --data (default
``.cache/dipid-testset`` under the current folder) and reused.

Prints one table: model x (mean IoU, instance P/R/F1 at IoU 0.5, COCO mask AP, hit AUC,
frames/s), on this machine's CPU unless --device says otherwise.

    python benchmarks/accuracy.py                          # shipped weights + classical
    python benchmarks/accuracy.py --weights runs/tlm       # a training run's best checkpoint
    python benchmarks/accuracy.py --scans 3 --frames 21    # a quick look
    python benchmarks/accuracy.py --per-preset             # also one table per preset (easy, realistic, hard)
    python benchmarks/accuracy.py --models joint --set peak_windows=32   # joint with a setting changed
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path

#: Base seed of the benchmark test set; dipid's training recipes never use it.
TEST_SEED = 20_261_121
PRESET_CYCLE = ("easy", "realistic", "hard")


def apply_settings(predictor, pairs: list[str]):
    """``predictor`` with ``NAME=VALUE`` settings changed (VALUE read as JSON, else as a string:
    ``peak_windows=null``, ``threshold=0.5``, ``fusion_anchor=tlm``)."""
    import json

    from dipid.errors import DipidError

    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise DipidError(f"--set {pair!r}: expected NAME=VALUE, such as peak_windows=32")
        try:
            changes[name] = json.loads(value)
        except ValueError:
            changes[name] = value
    return predictor.with_settings(**changes) if changes else predictor


def build_test_set(folder: Path, *, n_scans: int, n_frames: int, base_seed: int = TEST_SEED,
                   prefix: str = "test", presets: tuple[str, ...] = PRESET_CYCLE) -> list[Path]:
    """Write (once) and return the label files of the test set (or, with another ``base_seed``,
    of another set drawn the same way; scan k has preset ``presets[k % len(presets)]``)."""
    from dipid.synth import scan_seed, simulate_scan

    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    for k in range(n_scans):
        preset = presets[k % len(presets)]
        name = f"{prefix}_{k:02d}_{preset}"
        json_path = folder / f"{name}_labels.json"
        if not json_path.exists():
            simulate_scan(n_frames=n_frames, preset=preset, seed=scan_seed(base_seed, k)).write(folder, name)
        labels.append(json_path)
    return labels


def preset_of(scan_name: str) -> str:
    """The preset of a test-set scan, from its name (``test_03_easy.nxs`` -> ``easy``)."""
    stem = Path(scan_name).stem
    return next((p for p in PRESET_CYCLE if stem.endswith(f"_{p}")), "other")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(".cache/dipid-testset"), help="test-set folder")
    parser.add_argument("--scans", type=int, default=12)
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--weights", default=None, help="checkpoint file/folder (default: shipped weights/, if any)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tta", action="store_true", help="also evaluate with test-time augmentation")
    parser.add_argument("--json", type=Path, default=None, help="also write the full report as JSON")
    parser.add_argument("--per-preset", action="store_true", help="also score each preset's scans on their own")
    parser.add_argument("--models", nargs="+", default=None, help="score only these (default: every model available)")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                        help="change predictor settings from the weights' settings.json (VALUE as JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from dipid.errors import WeightsNotFoundError
    from dipid.evaluate import evaluate
    from dipid.predict import JointPredictor

    data = args.data / f"{args.scans}x{args.frames}"
    labels = build_test_set(data, n_scans=args.scans, n_frames=args.frames)
    try:
        predictor = JointPredictor.from_pretrained(args.weights, device=args.device)
        models = list(predictor.available_models)
    except WeightsNotFoundError as exc:
        print(f"no trained weights ({exc}); evaluating the classical baseline only", file=sys.stderr)
        predictor = JointPredictor(device=args.device)
        models = ["classical"]
    predictor = apply_settings(predictor, args.set)
    models = args.models or models
    group_of = preset_of if args.per_preset else None
    reports = {"": evaluate(predictor, labels, models=models, batch_size=args.batch_size, group_of=group_of)}
    if args.tta:
        reports["+tta"] = evaluate(predictor, labels, models=models, tta=True, batch_size=args.batch_size)

    print(f"\ntest set: {args.scans} scans x {args.frames} frames ({data}); device {args.device}; "
          f"{os.cpu_count()} CPU cores ({platform.machine()})\n")
    cols = ("mean_iou", "precision", "recall", "f1", "AP", "AP50", "hit_auc", "fp_area_per_empty_frame", "frames_per_s")
    short = {"fp_area_per_empty_frame": "fp_px/empty"}
    header = f"{'model':20s}" + "".join(f"{short.get(c, c):>13s}" for c in cols)
    print(header)
    print("-" * len(header))
    for suffix, report in reports.items():
        for model, row in report.summary.items():
            print(f"{model + suffix:20s}" + "".join(f"{row.get(c, float('nan')):13.3f}" for c in cols))
    for preset in PRESET_CYCLE if args.per_preset else ():
        for model, groups in reports[""].per_group.items():
            row = groups.get(preset, {})
            print(f"{model + ' ' + preset:20s}" + "".join(f"{row.get(c, float('nan')):13.3f}" for c in cols))
    if args.json:
        reports[""].to_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
