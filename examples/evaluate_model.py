"""Evaluate models on labelled scans: DiPID's IoU, instance P/R/F1, mask AP, hit finding.

Scores every model the predictor holds (tlm, ssl, joint) and the classical baseline, overall and
per scan. Without --data it simulates a small labelled test set.

    python examples/evaluate_model.py --data test_labels.json --weights runs/tlm --out report.json
    # the same from the shell: dipid evaluate --model runs/tlm --data test_labels.json --out report.json
"""

import argparse
import logging
import tempfile

from _common import get_predictor

from dipid.evaluate import evaluate
from dipid.synth import simulate_dataset

parser = argparse.ArgumentParser()
parser.add_argument("--data", help="COCO JSON or folder (default: simulated)")
parser.add_argument("--weights", default=None)
parser.add_argument("--frames", type=int, default=21, help="frames per simulated scan")
parser.add_argument("--tta", action="store_true", help="test-time augmentation")
parser.add_argument("--out", default=None)
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING)

if args.data is None:
    args.data = tempfile.mkdtemp()
    simulate_dataset(args.data, n_scans=2, n_frames=args.frames, seed=300, preset="realistic")

predictor = get_predictor(args.weights)
report = evaluate(predictor, args.data, tta=args.tta)
print(report.format_table())
if args.out:
    report.to_json(args.out)
