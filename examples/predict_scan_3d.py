"""Predict a whole scan, link the peaks across frames and open the 3D plot.

Prints the 3D peak table (one row per reflection: frames, centroid on the scan axis,
background-subtracted intensity) and writes the 3D plot of the stacked masks, the NeXus results
file and the interactive viewer.

    python examples/predict_scan_3d.py --scan 1040323.nxs --out-dir results/
"""

import argparse
import logging
import tempfile
from pathlib import Path

from _common import get_predictor

from dipid.synth import simulate_scan
from dipid.viz import save_html

parser = argparse.ArgumentParser()
parser.add_argument("--scan", help="NeXus scan (default: a simulated one)")
parser.add_argument("--frames", type=int, default=61, help="frames of the simulated scan")
parser.add_argument("--weights", default=None)
parser.add_argument("--out-dir", default="scan_results")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)

scan = args.scan or simulate_scan(n_frames=args.frames, seed=5).write(tempfile.mkdtemp(), "example").nexus
out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)

predictor = get_predictor(args.weights)
result = predictor.predict_scan(scan, batch_size=8)
peaks = result.peaks(model="joint")
print(peaks.to_dataframe())
save_html(predictor.generate_3d_plot(result, scan_type="joint"), out / "volume_3d.html")
result.to_nexus(out / "results.nxs", peaks=peaks)
result.view(out / "viewer.html")
print(f"wrote {out}/volume_3d.html, results.nxs, viewer.html")
