"""Quick SSLM benchmark on simulated I16 scans (CPU, a few minutes).

Trains an SSLM on simulated Pilatus 100K scans (``realistic`` by default; ``--preset
easy,realistic,hard`` cycles through presets scan by scan), assigns its channel roles
automatically (and, for comparison, from the ground truth of a few training frames), and reports
the mean IoU of the peak mask on held-out scans: per frame, the IoU of the predicted mask with
the union of the true instance masks, averaged over the frames that have ground truth.

    python benchmarks/sslm_quick.py                       # defaults below
    python benchmarks/sslm_quick.py --steps 400 --channels 100 --train-scans 6
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from dipid.models import normalize_counts, save_checkpoint
from dipid.models.sslm import ROLE_BACKGROUND, SSLMConfig, assign_channels
from dipid.io import fill_bad_pixels
from dipid.synth import simulate_scan
from dipid.train.sslm import frames_to_tensor, train_sslm_on_frames


def filled(frames: np.ndarray) -> np.ndarray:
    """Counts with bad (negative) pixels filled from their neighbours."""
    return fill_bad_pixels(frames, frames < 0)


def load_scans(seeds: list[int], n_frames: int, preset: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) filled counts and (N, H, W) bool union truth masks of the scans' frames; scan k
    uses the k-th of the comma-separated presets (cycling)."""
    presets = preset.split(",")
    frames, truth = [], []
    for k, seed in enumerate(seeds):
        scan = simulate_scan(n_frames=n_frames, preset=presets[k % len(presets)], seed=seed)
        frames.append(filled(scan.frames))
        truth.append(np.stack([scan.truth_masks(i).any(axis=0) for i in range(scan.n_frames)]))
    return np.concatenate(frames), np.concatenate(truth)


def mean_iou(model, frames: np.ndarray, truth: np.ndarray, chunk: int = 4) -> tuple[float, int]:
    """Mean per-frame IoU over frames with ground truth, and how many frames that is."""
    scores = []
    with torch.no_grad():
        for start in range(0, len(frames), chunk):
            x = normalize_counts(torch.from_numpy(frames[start : start + chunk]).float())[:, None]
            predicted = model.peak_mask(x).numpy()
            for p, t in zip(predicted, truth[start : start + chunk]):
                if t.any():
                    scores.append((p & t).sum() / (p | t).sum())
    return float(np.mean(scores)), len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="realistic")
    parser.add_argument("--train-scans", type=int, default=4)
    parser.add_argument("--test-scans", type=int, default=3)
    parser.add_argument("--frames", type=int, default=31, help="frames per simulated scan")
    parser.add_argument("--channels", type=int, default=32)
    defaults = SSLMConfig()
    parser.add_argument("--num-conv", type=int, default=defaults.num_conv)
    parser.add_argument("--continuity-weight", type=float, default=defaults.continuity_weight)
    parser.add_argument("--context-weight", type=float, default=defaults.context_weight)
    parser.add_argument("--min-significance", type=float, default=defaults.min_significance,
                        help="component significance test at inference (0: off)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop", type=int, nargs=2, default=(128, 128), metavar=("ROWS", "COLS"))
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", default=None, help="write the trained model to this .safetensors file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    train_frames, train_truth = load_scans(list(range(args.train_scans)), args.frames, args.preset)
    test_frames, test_truth = load_scans(list(range(1000, 1000 + args.test_scans)), args.frames, args.preset)
    start = time.perf_counter()
    model = train_sslm_on_frames(
        train_frames,
        config=SSLMConfig(
            channels=args.channels,
            num_conv=args.num_conv,
            continuity_weight=args.continuity_weight,
            context_weight=args.context_weight,
            min_significance=args.min_significance,
        ),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        crop=tuple(args.crop),
        progress=False,
    )
    train_seconds = time.perf_counter() - start
    if args.save:
        save_checkpoint(model, args.save, metadata={"benchmark": "sslm_quick", **vars(args)})
    roles = list(model.config.channel_roles)
    iou_auto, n_frames = mean_iou(model, test_frames, test_truth)

    # For comparison: roles from the ground truth of 8 training frames that have peaks.
    labelled = np.flatnonzero(train_truth.reshape(len(train_truth), -1).any(axis=1))
    picks = labelled[np.linspace(0, len(labelled) - 1, 8).round().astype(int)]
    assign_channels(model, frames_to_tensor(train_frames[picks]), labels=torch.from_numpy(train_truth[picks]))
    iou_labels, _ = mean_iou(model, test_frames, test_truth)

    result = {
        "preset": args.preset,
        "train_frames": len(train_frames),
        "test_frames_with_truth": n_frames,
        "channels": args.channels,
        "num_conv": args.num_conv,
        "continuity_weight": args.continuity_weight,
        "context_weight": args.context_weight,
        "min_significance": args.min_significance,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "crop": list(args.crop),
        "train_seconds": round(train_seconds, 1),
        "peak_channels_auto": [c for c, r in enumerate(roles) if r != ROLE_BACKGROUND],
        "mean_iou_auto": round(iou_auto, 3),
        "mean_iou_from_8_labelled_frames": round(iou_labels, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
