"""Predict the peaks in one detector frame and look at them.

Runs the JointPredictor (TLM + SSLM, fused) on frame FRAME of a scan, prints the peaks it found
and writes an HTML figure with the frame in linear and log scale and the masks overlaid.
Without --scan it simulates a realistic I16 scan first.

    python examples/predict_one_image.py --scan 1040323.nxs --frame 10 --out frame10.html
"""

import argparse
import logging
import tempfile

from _common import get_predictor

from dipid.synth import simulate_scan
from dipid.viz import save_html

parser = argparse.ArgumentParser()
parser.add_argument("--scan", help="NeXus scan (default: a simulated one)")
parser.add_argument("--frame", type=int, default=30)
parser.add_argument("--weights", default=None, help="checkpoint file/folder (default: shipped weights/)")
parser.add_argument("--out", default="frame_predictions.html")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)

scan = args.scan or simulate_scan(n_frames=61, seed=5).write(tempfile.mkdtemp(), "example").nexus
predictor = get_predictor(args.weights)
result = predictor.predict_one_image(scan, args.frame)
for model in ("tlm", "ssl", "joint"):
    print(f"{model:6s}: {len(result.instances(model))} peaks")
print(result.joint.to_dict())
save_html(predictor.show_image_predictions(scan, args.frame), args.out)
print(f"wrote {args.out}")
