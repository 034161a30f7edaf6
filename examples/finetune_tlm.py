"""Fine-tune the TLM (Mask R-CNN) on labelled scans.

Labelled data is COCO JSON next to the scans (`dipid labels convert` makes it from a Zooniverse
export). Without --train this simulates a small labelled set. The run folder holds
best.safetensors, last.safetensors, history.csv and history.html, and can be resumed.

    python examples/finetune_tlm.py --train labels.json --val val_labels.json --out runs/tlm --epochs 20
    # the same from the shell:
    # dipid train tlm --train labels.json --val val_labels.json --out runs/tlm --base-weights weights/tlm.safetensors
"""

import argparse
import logging
import tempfile
from pathlib import Path

from dipid import JointPredictor
from dipid.synth import simulate_dataset
from dipid.train.tlm import train_tlm

parser = argparse.ArgumentParser()
parser.add_argument("--train", help="COCO JSON / folder (default: simulated)")
parser.add_argument("--val", help="COCO JSON / folder (default: simulated)")
parser.add_argument("--out", default="runs/example_tlm")
parser.add_argument("--base-weights", default=None, help="coco, a checkpoint, or omit for random init")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--steps-per-epoch", type=int, default=None)
parser.add_argument("--val-frames", type=int, default=None)
parser.add_argument("--batch-size", type=int, default=2)
parser.add_argument("--sim-frames", type=int, default=12, help="frames per simulated scan")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)

if args.train is None:
    data = Path(tempfile.mkdtemp())
    simulate_dataset(data / "train", n_scans=2, n_frames=args.sim_frames, seed=100)
    simulate_dataset(data / "val", n_scans=1, n_frames=args.sim_frames, seed=200)
    args.train, args.val = str(data / "train"), str(data / "val")

summary = train_tlm(train=args.train, val=args.val, out=args.out, base_weights=args.base_weights,
                    freeze="none" if args.base_weights is None else "backbone", epochs=args.epochs,
                    batch_size=args.batch_size, steps_per_epoch=args.steps_per_epoch, val_frames=args.val_frames)
print(summary)
predictor = JointPredictor.from_pretrained(args.out)  # loads best.safetensors
print("fine-tuned model ready:", predictor.available_models)
