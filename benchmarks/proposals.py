"""How many RPN proposals does the TLM need on detector frames? Accuracy and speed per setting.

torchvision's Mask R-CNN sends 1000 proposals a frame to its box head, a number sized for COCO
photographs with dozens of objects of 80 classes; on a 2-core CPU the box head's RoIAlign and
fully connected layers then cost more than the ResNet-50 backbone. A Pilatus frame holds a few
peaks of one class. This runs the TLM on the benchmark test set (``benchmarks/accuracy.py``)
with each setting and prints the metrics, the frames per second and how many frames get exactly
the instances of the 1000-proposal run (same count, every mask IoU >= 0.9 with its partner).

    python benchmarks/proposals.py --weights runs/joint
    python benchmarks/proposals.py --weights runs/joint --scans 3 --frames 21 --proposals 1000 300 100 50
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import build_test_set  # noqa: E402


def same_instances(a, b, *, iou: float = 0.9) -> bool:
    """Same number of instances and a one-to-one pairing with mask IoU >= ``iou``."""
    import numpy as np

    from dipid.metrics import mask_iou_matrix

    if len(a) != len(b):
        return False
    if len(a) == 0:
        return True
    ious = mask_iou_matrix(a.masks, b.masks)
    return bool(np.all(ious.max(axis=1) >= iou) and np.all(ious.max(axis=0) >= iou))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="folder with tlm.safetensors (or the checkpoint)")
    parser.add_argument("--data", type=Path, default=Path(".cache/dipid-testset"))
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--frames", type=int, default=31)
    parser.add_argument("--proposals", type=int, nargs="+", default=[1000, 300, 100])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import time

    from dipid.evaluate import iter_labelled_batches, load_label_sets
    from dipid.metrics import evaluate_frames
    from dipid.predict import JointPredictor, PredictorSettings

    files = build_test_set(args.data / f"{args.scans}x{args.frames}", n_scans=args.scans, n_frames=args.frames)
    label_sets = load_label_sets(files)
    runs: dict[int, dict] = {}
    for proposals in args.proposals:
        predictor = JointPredictor.from_pretrained(args.weights, device=args.device,
                                                   settings=PredictorSettings(proposals=proposals))
        gt, valid, found, seconds = [], [], [], 0.0
        for _, chunk, counts, bad in iter_labelled_batches(label_sets, args.batch_size):
            t0 = time.perf_counter()
            results = predictor.predict_frames(counts, bad_pixels=bad, models="tlm", keep_probability=False)
            seconds += time.perf_counter() - t0
            gt += [fl.masks() for fl in chunk]
            valid += [~b for b in bad]
            found += [r.tlm for r in results]
        summary = evaluate_frames(gt, [(f.masks, f.scores) for f in found], valid=valid)
        runs[proposals] = {"summary": summary, "found": found, "fps": len(found) / seconds}
        print(f"  {proposals} proposals: {runs[proposals]['fps']:.2f} frames/s", file=sys.stderr)

    reference = runs[max(runs)]["found"]
    print(f"\nTLM {args.weights}; test set {args.scans} scans x {args.frames} frames; device {args.device}; "
          f"{os.cpu_count()} CPU cores ({platform.machine()})\n")
    cols = ("mean_iou", "precision", "recall", "f1", "hit_auc")
    header = f"{'proposals':>9s}" + "".join(f"{c:>10s}" for c in cols) + f"{'frames/s':>10s}{'same as ' + str(max(runs)):>16s}"
    print(header)
    print("-" * len(header))
    for proposals, run in runs.items():
        same = sum(same_instances(a, b) for a, b in zip(run["found"], reference))
        print(f"{proposals:9d}" + "".join(f"{run['summary'][c]:10.3f}" for c in cols)
              + f"{run['fps']:10.2f}{f'{same}/{len(reference)} frames':>16s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
