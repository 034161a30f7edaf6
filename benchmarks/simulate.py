"""Time the scan simulator and summarise its ground truth, preset x detector.

    python benchmarks/simulate.py                 # 5 Pilatus seeds, 2 Eiger seeds per preset
    python benchmarks/simulate.py --seeds 20 --detectors pilatus100k

"s/scan cpu" is the CPU time of this process per scan (time.process_time), i.e. seconds of one
core: the simulator is single-threaded NumPy (no BLAS calls), and the thread variables below are
set to 1 before NumPy loads so no library spawns helper threads. "s/scan wall" is also shown; on
a busy machine it is larger than the CPU time. The target is under 2 s of one core for a 61-frame
Pilatus scan. "peaks/frame" is the mean number of instances on frames that have any; "empty" is
the share of frames without peaks; "area p25/p50/p75" are ground-truth instance areas in px²
(real I16 labels: 170 / 770 / 2430).
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import time  # noqa: E402

import numpy as np  # noqa: E402

from dipid.synth import DETECTORS, PRESETS, simulate_scan  # noqa: E402


def measure(preset: str, detector: str, seeds: range) -> dict[str, float]:
    """Simulate one scan per seed; return timing and ground-truth summary numbers."""
    cpu, wall, areas, per_frame = [], [], [], []
    frames = empty = 0
    for seed in seeds:
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        scan = simulate_scan(preset=preset, detector=detector, seed=seed)
        cpu.append(time.process_time() - t_cpu)
        wall.append(time.perf_counter() - t_wall)
        frames = scan.n_frames
        for labels in scan.labels:
            if len(labels):
                per_frame.append(len(labels))
                areas.extend(labels.areas().tolist())
            else:
                empty += 1
    n_frames_total = frames * len(seeds)
    p25, p50, p75 = np.percentile(areas, [25, 50, 75]) if areas else (np.nan,) * 3
    return {
        "cpu": float(np.mean(cpu)), "cpu_max": float(np.max(cpu)), "wall": float(np.mean(wall)), "frames": frames,
        "peaks_per_frame": float(np.mean(per_frame)) if per_frame else 0.0, "empty": empty / max(n_frames_total, 1),
        "p25": float(p25), "p50": float(p50), "p75": float(p75), "instances": len(areas),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="Pilatus scans per preset (default 5)")
    parser.add_argument("--eiger-seeds", type=int, default=2, help="Eiger scans per preset (default 2)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    args = parser.parse_args(argv)

    header = (f"{'preset':<10} {'detector':<12} {'s/scan cpu':>10} {'(max)':>6} {'s/scan wall':>11} {'frames':>6} "
              f"{'peaks/frame':>11} {'empty':>6} {'area p25/p50/p75':>20} {'instances':>9}")
    print(header)
    print("-" * len(header))
    for detector in args.detectors:
        n_seeds = args.eiger_seeds if DETECTORS[detector].eiger_scene is not None else args.seeds
        for preset in args.presets:
            r = measure(preset, detector, range(n_seeds))
            areas = f"{r['p25']:.0f}/{r['p50']:.0f}/{r['p75']:.0f}"
            print(f"{preset:<10} {detector:<12} {r['cpu']:>10.2f} {r['cpu_max']:>6.2f} {r['wall']:>11.2f} "
                  f"{r['frames']:>6d} {r['peaks_per_frame']:>11.2f} {r['empty']:>6.2f} {areas:>20} "
                  f"{r['instances']:>9d}")


if __name__ == "__main__":
    main()
