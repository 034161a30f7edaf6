"""3D peak linking on simulated scans: recall and precision of linked peaks against truth.

For each seed a ``realistic`` Pilatus scan is simulated; per-frame instances are taken from

- ``truth``: the ground-truth instances themselves (overlaps go to the first listed),
- ``dominance``: each frame of :meth:`SimulatedScan.truth_volume` (pixels go to the brightest
  reflection), so only the linking can go wrong,
- ``perturbed``: the truth with one interior frame of every reflection of >= 3 frames dropped
  and each mask randomly eroded or dilated by one pixel (linked with and without gap bridging),
- ``classical``: :class:`dipid.classical.ClassicalFinder` on the filled frames,
- ``joint`` (and ``tlm``, ``ssl``) with ``--weights``: :class:`dipid.JointPredictor` with those
  weights (and their ``settings.json``) on the filled frames,

then linked with :func:`dipid.volume.link_peaks_3d` (``CC`` rows: ``min_overlap=0``, plain
connected components; the others the default ``min_overlap=0.5``; ``max_gap=1`` and
``min_frames=1`` unless named)
and matched to the true reflections
(:meth:`SimulatedScan.truth_volume`) by 3D voxel IoU with :func:`dipid.volume.match_peaks_3d`.
For matched peaks, ``I err`` is the median |relative error| of the :func:`peaks_table` intensity
against an oracle: counts minus the simulator's expected background, summed over the true
footprint.

Usage::

    python benchmarks/peaks3d.py --seeds 10 --frames 61 [--iou 0.5] [--no-classical] [--weights weights]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from scipy import ndimage

from dipid.volume import link_peaks_3d, match_peaks_3d, peaks_table


def _simulate(n_frames: int, seed: int):
    try:
        from dipid.synth import simulate_scan
    except ImportError:  # the package's __init__ may not re-export it yet
        from dipid.synth.scan import simulate_scan
    return simulate_scan(n_frames=n_frames, preset="realistic", seed=seed)


def truth_instance_labels(sim) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(F, H, W) int32 per-frame instance labels of the truth, plus per-frame masks and reflection ids."""
    n, h, w = sim.frames.shape
    labels = np.zeros((n, h, w), np.int32)
    masks_per_frame, ids_per_frame = [], []
    for f, frame_labels in enumerate(sim.labels):
        masks = frame_labels.masks()
        masks_per_frame.append(masks)
        ids_per_frame.append(np.asarray(frame_labels.reflection_ids))
        for i in range(len(masks) - 1, -1, -1):  # the first instance wins overlaps
            labels[f][masks[i]] = i + 1
    return labels, masks_per_frame, ids_per_frame


def perturbed_instance_labels(masks_per_frame: list[np.ndarray], ids_per_frame: list[np.ndarray],
                              rng: np.random.Generator) -> np.ndarray:
    """Truth instances with one interior frame per reflection dropped and masks shrunk or grown by 1 px."""
    frames_of: dict[int, list[int]] = defaultdict(list)
    for f, ids in enumerate(ids_per_frame):
        for rid in ids:
            frames_of[int(rid)].append(f)
    dropped = {(rid, int(rng.choice(fs[1:-1]))) for rid, fs in frames_of.items() if len(fs) >= 3}
    n = len(masks_per_frame)
    h, w = masks_per_frame[0].shape[1:]
    labels = np.zeros((n, h, w), np.int32)
    cross = ndimage.generate_binary_structure(2, 1)
    for f, (masks, ids) in enumerate(zip(masks_per_frame, ids_per_frame)):
        for i in range(len(masks) - 1, -1, -1):
            if (int(ids[i]), f) in dropped:
                continue
            mask = masks[i]
            if rng.random() < 0.5:
                eroded = ndimage.binary_erosion(mask, structure=cross)
                mask = eroded if eroded.sum() >= 4 else mask
            else:
                mask = ndimage.binary_dilation(mask, structure=cross)
            labels[f][mask] = i + 1
    return labels


def classical_instance_labels(sim) -> np.ndarray:
    from dipid.classical import ClassicalFinder
    from dipid.io import fill_bad_pixels

    bad = sim.bad_pixels
    filled = fill_bad_pixels(sim.frames, bad)
    found = ClassicalFinder()(filled, bad)
    labels = np.zeros(sim.frames.shape, np.int32)
    for f, result in enumerate(found):
        for i in range(len(result.masks) - 1, -1, -1):
            labels[f][result.masks[i]] = i + 1
    return labels


def predictor_instance_labels(predictor, sim, models: tuple[str, ...]) -> dict[str, np.ndarray]:
    """(F, H, W) int32 per-frame instance labels of each model of a JointPredictor."""
    from dipid.io import fill_bad_pixels

    bad = sim.bad_pixels
    filled = fill_bad_pixels(sim.frames, bad).astype(np.float32)
    out = {m: np.zeros(sim.frames.shape, np.int32) for m in models}
    for start in range(0, len(filled), 8):
        results = predictor.predict_frames(filled[start:start + 8], bad_pixels=bad[start:start + 8],
                                           keep_probability=False)
        for k, res in enumerate(results):
            for m in models:
                out[m][start + k] = res.instances(m).label_image()
    return out


def intensity_errors(pred: np.ndarray, truth: np.ndarray, matches: np.ndarray, sim) -> list[float]:
    """|relative error| of peaks_table intensities of matched peaks against the background oracle."""
    if not len(matches):
        return []
    table = peaks_table(pred, sim.frames, bad_pixels=sim.bad_pixels)
    by_id = dict(zip(table["id"].tolist(), table["intensity"].tolist()))
    good = ~sim.bad_pixels
    oracle_excess = (sim.frames.astype(np.float64) - sim.background) * good
    oracle = ndimage.sum_labels(oracle_excess, truth, index=matches[:, 1])
    errors = []
    for (p, _), true_intensity in zip(matches, oracle):
        if true_intensity > 0:
            errors.append(abs(by_id[int(p)] - true_intensity) / true_intensity)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--no-classical", action="store_true")
    parser.add_argument("--weights", default=None, help="also link the joint/tlm/ssl peaks of these weights")
    args = parser.parse_args()
    predictor, net_models = None, ()
    if args.weights:
        from dipid.predict import JointPredictor

        predictor = JointPredictor.from_pretrained(args.weights, device="cpu")
        net_models = tuple(m for m in predictor.available_models if m != "classical")

    # (instance stack, max_gap, min_overlap, min_frames) per row
    rows = {
        "truth, CC": ("truth", 1, 0.0, 1),
        "truth": ("truth", 1, 0.5, 1),
        "dominance, CC": ("dominance", 1, 0.0, 1),
        "dominance": ("dominance", 1, 0.5, 1),
        "perturbed, CC": ("perturbed", 1, 0.0, 1),
        "perturbed": ("perturbed", 1, 0.5, 1),
        "perturbed gap=0": ("perturbed", 0, 0.5, 1),
        "perturbed frames>=2": ("perturbed", 1, 0.5, 2),
    }
    if not args.no_classical:
        rows["classical, CC"] = ("classical", 1, 0.0, 1)
        rows["classical"] = ("classical", 1, 0.5, 1)
        rows["classical frames>=2"] = ("classical", 1, 0.5, 2)
    for model in net_models:
        rows[model] = (model, 1, 0.5, 1)
        rows[f"{model} frames>=2"] = (model, 1, 0.5, 2)
    totals = {row: {"tp": 0, "fp": 0, "fn": 0, "iou": [], "ierr": []} for row in rows}
    n_reflections = 0
    started = time.perf_counter()
    for seed in range(args.seeds):
        sim = _simulate(args.frames, seed)
        truth = sim.truth_volume()
        n_reflections += len(np.unique(truth[truth > 0]))
        labels, masks, ids = truth_instance_labels(sim)
        stacks = {
            "truth": labels,
            # each frame's truth split by the brightest reflection per pixel: no overlapping instances
            "dominance": truth,
            "perturbed": perturbed_instance_labels(masks, ids, np.random.default_rng(1000 + seed)),
        }
        if not args.no_classical:
            stacks["classical"] = classical_instance_labels(sim)
        if predictor is not None:
            stacks.update(predictor_instance_labels(predictor, sim, net_models))
        for row, (stack_name, gap, overlap, min_frames) in rows.items():
            pred = link_peaks_3d(stacks[stack_name], max_gap=gap, min_overlap=overlap, min_frames=min_frames)
            result = match_peaks_3d(pred, truth, iou_threshold=args.iou)
            total = totals[row]
            for key in ("tp", "fp", "fn"):
                total[key] += result[key]
            if result["tp"]:
                total["iou"].append(result["mean_iou"])
            total["ierr"] += intensity_errors(pred, truth, result["matches"], sim)
        print(f"seed {seed}: {len(np.unique(truth[truth > 0]))} reflections ({time.perf_counter() - started:.0f} s)",
              flush=True)

    print(f"\n{args.seeds} realistic scans x {args.frames} frames, {n_reflections} reflections, IoU >= {args.iou}\n")
    print(f"{'predictions':<22}{'TP':>6}{'FP':>6}{'FN':>6}{'precision':>11}{'recall':>8}{'mean IoU':>10}{'I err':>8}")
    for row, total in totals.items():
        tp, fp, fn = total["tp"], total["fp"], total["fn"]
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / (tp + fn) if tp + fn else 1.0
        iou = float(np.mean(total["iou"])) if total["iou"] else float("nan")
        ierr = float(np.median(total["ierr"])) if total["ierr"] else float("nan")
        print(f"{row:<22}{tp:>6}{fp:>6}{fn:>6}{precision:>11.3f}{recall:>8.3f}{iou:>10.3f}{ierr:>8.3f}")


if __name__ == "__main__":
    main()
