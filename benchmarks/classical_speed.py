"""Frames per second of the classical peak finder, per detector, on simulated scans.

    python benchmarks/classical_speed.py                           # Pilatus 100K and Eiger 4M
    python benchmarks/classical_speed.py --detectors eiger4m --frames 8 --repeat 3
    python benchmarks/classical_speed.py --check masks.npz         # also: masks equal to a saved run?
    python benchmarks/classical_speed.py --save masks.npz          # save this run's masks

For each detector one scan is simulated (``--preset``, fixed seed), its bad pixels found and
filled as :meth:`dipid.io.Scan.read_frames` does (module gaps, dead and saturated pixels), and the
frames are handed to one :class:`dipid.classical.ClassicalFinder` a frame at a time with their own
bad-pixel masks, as the predictor does, after one warm-up frame.

- ``frames/s``: the scan's frames over the summed wall time of the finder calls (the fastest of
  ``--repeat`` passes); ``ms/frame``: the median wall time of a call;
- ``cpu ms/frame``: this process's CPU time per call. On a busy machine the wall time is larger;
  the finder is single-threaded NumPy and SciPy (thread variables are set to 1 before NumPy loads);
- ``+ dense masks ms``: what a caller then spends on ``result.masks``, the (N, H, W) bool masks
  (``result.labels`` holds the same peaks in one (H, W) image).

``--save``/``--check`` store and compare every frame's masks (as label images) and scores: a
change to the finder can be checked to give the same peaks on the same frames.

Measured with the defaults on a 2-core AMD EPYC shared with a CPU training job (one core's worth
for this process), before and after the finder was made sparse (same masks and scores):

    detector     frame        frames/s before   frames/s after
    pilatus100k  195 x 487    169 - 181          207 - 227
    eiger4m      2162 x 2068  1.4 - 1.5          14.5 - 16.8
"""

from __future__ import annotations

import argparse
import os
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

#: frames per detector when --frames is not given (an Eiger 4M frame is 18 MB and ~1 s to simulate)
DEFAULT_FRAMES = {"pilatus100k": 31, "eiger4m": 4}


def scan_frames(detector: str, n_frames: int, preset: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Simulated frames as the predictor gets them: ((F, H, W) float32 filled counts, (F, H, W) bool bad)."""
    from dipid.io.pixels import bad_pixels, fill_bad_pixels
    from dipid.synth import simulate_scan

    scan = simulate_scan(detector=detector, n_frames=n_frames, preset=preset, seed=seed)
    bad = bad_pixels(scan.frames, saturation_value=scan.saturation_value)
    return fill_bad_pixels(scan.frames, bad), bad


def label_image(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(N, H, W) bool masks of one frame (disjoint) as an (H, W) int32 image: 0 = none, k + 1 = mask k."""
    labels = np.zeros(shape, np.int32)
    for k, mask in enumerate(masks):
        labels[mask] = k + 1
    return labels


def time_scan(frames: np.ndarray, bad: np.ndarray, repeat: int) -> dict:
    """Run the finder over every frame ``repeat`` times; timings of the best pass and the last pass's peaks.

    Each frame's time is the finder call's; ``masks_s`` is the extra time of building the frame's
    dense (N, H, W) masks (``result.masks``) afterwards, as a caller that wants them pays it.
    """
    from dipid.classical import ClassicalFinder

    finder = ClassicalFinder()
    finder(frames[:1], bad[:1])  # warm-up: lazily built caches, first-touch page faults
    best: dict = {}
    for _ in range(max(repeat, 1)):
        per_frame, masks_s, cpu, peaks = [], 0.0, 0.0, []
        for frame, frame_bad in zip(frames, bad):
            t0, c0 = time.perf_counter(), time.process_time()
            result = finder(frame[None], frame_bad[None])[0]
            t1 = time.perf_counter()
            cpu += time.process_time() - c0
            masks = result.masks
            masks_s += time.perf_counter() - t1
            per_frame.append(t1 - t0)
            labels = getattr(result, "labels", None)  # not timed (older finders had only masks)
            peaks.append((label_image(masks, frame.shape) if labels is None else labels, result.scores))
            del result, masks
        wall = sum(per_frame)
        if not best or wall < best["wall"]:
            best = {"wall": wall, "cpu": cpu, "per_frame": per_frame, "masks_s": masks_s, "peaks": peaks}
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=list(DEFAULT_FRAMES), choices=list(DEFAULT_FRAMES))
    parser.add_argument("--frames", type=int, default=0, help="frames per detector (default: 31 Pilatus, 4 Eiger)")
    parser.add_argument("--preset", default="realistic")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=2, help="passes over the frames; the fastest counts")
    parser.add_argument("--save", type=Path, default=None, help="write every frame's masks and scores to this .npz")
    parser.add_argument("--check", type=Path, default=None, help="compare masks and scores with a --save file")
    args = parser.parse_args()

    rows, saved, mismatches = [], {}, []
    reference = dict(np.load(args.check)) if args.check else None
    for detector in args.detectors:
        n_frames = args.frames or DEFAULT_FRAMES[detector]
        frames, bad = scan_frames(detector, n_frames, args.preset, args.seed)
        run = time_scan(frames, bad, args.repeat)
        shape = frames.shape[1:]
        for k, (labels, scores) in enumerate(run["peaks"]):
            key = f"{detector}_{k:03d}"
            saved[key + "_labels"], saved[key + "_scores"] = labels, scores
            if reference is not None and key + "_labels" in reference:
                same = (np.array_equal(reference[key + "_labels"], labels)
                        and np.array_equal(reference[key + "_scores"], scores))
                if not same:
                    mismatches.append(key)
        rows.append({"detector": detector, "shape": shape, "frames": n_frames, "wall": run["wall"], "cpu": run["cpu"],
                     "median_ms": 1e3 * float(np.median(run["per_frame"])),
                     "masks_ms": 1e3 * run["masks_s"] / n_frames,
                     "peaks": sum(len(scores) for _, scores in run["peaks"]) / n_frames})

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nclassical finder, preset {args.preset}, seed {args.seed}; {os.cpu_count()} CPU cores "
          f"({platform.processor() or platform.machine()}), load average {load:.1f}; "
          f"{os.environ.get('OMP_NUM_THREADS', '?')} NumPy/BLAS thread(s)\n")
    header = (f"{'detector':12s} {'frame':>11s} {'frames':>6s} {'frames/s':>9s} {'ms/frame':>9s} {'cpu ms/frame':>13s} "
              f"{'+ dense masks ms':>17s} {'peaks/frame':>12s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        size = f"{r['shape'][0]} x {r['shape'][1]}"
        print(f"{r['detector']:12s} {size:>11s} {r['frames']:6d} {r['frames'] / r['wall']:9.2f} {r['median_ms']:9.1f} "
              f"{1e3 * r['cpu'] / r['frames']:13.1f} {r['masks_ms']:17.1f} {r['peaks']:12.1f}")
    if args.save:
        np.savez_compressed(args.save, **saved)
        print(f"\nmasks and scores written to {args.save}")
    if reference is not None:
        compared = sum(1 for key in saved if key.endswith("_labels") and key in reference)
        verdict = (f"{len(mismatches)} differ: {', '.join(mismatches[:10])}" if mismatches
                   else "all masks and scores equal")
        print(f"\n{compared} frames compared with {args.check}: {verdict}")
        return 1 if mismatches else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
