"""Peak memory and wall time of `dipid predict` against scan length and detector size.

Issue 14's targets: peak RSS must not grow with the number of frames (1000 Pilatus frames within
10 % of 100) and a 200-frame Eiger 4M scan must stay under 4 GB. Each configuration is one fresh
`dipid predict --model <model> SCAN --out DIR` process; its peak RSS is the child's ``ru_maxrss``
(read by a small parent process that runs only it) and its wall time includes start-up and all
three outputs (peak CSV, viewer HTML, results NeXus).

Scans are simulated (``dipid.synth.simulate_scan(..., detector=...)``) in their own subprocess
into ``--work`` and reused by later runs: a 200-frame Eiger 4M scan takes a few minutes and about
4 GB to simulate. The joint rows use the shipped weights (``weights/``), or ``--weights FOLDER``;
without either they are skipped with the reason.

    python benchmarks/scale.py                                   # 100/1000 Pilatus, 20/200 Eiger 4M
    python benchmarks/scale.py --pilatus 100 400 --eiger 5 20    # a quicker check
    python benchmarks/scale.py --eiger 200 --pilatus --timeout 1800

Measured with ``--timeout 1200`` (classical; wall s / frames/s / peak RSS GB) on the 2-core AMD
EPYC shared with a CPU training job, before and after the classical finder ran on whole frames,
the viewer planned its page before building it (built once), the peak table and the 3D linking
visited only labelled pixels and read the stored counts, and the label volumes were written as
their non-empty 128 x 128 chunks:

    scan           frames   before                  after
    Pilatus 100K      100     9.7 s  10.3/s  1.25     7.3 s  13.7/s  1.20
    Pilatus 100K     1000    22.8 s  43.8/s  1.09    16.0 s  62.6/s  1.07
    Eiger 4M           20    38.5 s  0.52/s  1.84    13.8 s  1.45/s  1.61
    Eiger 4M          200   236.3 s  0.85/s  2.04    56.4 s  3.55/s  1.94

Of the 56 s of the 200-frame Eiger run, by stage (one run, cProfile-free): starting the process
and importing torch about 4 s, prediction (reading, bad pixels, the finder) 25 s, the peak table
(re-reading the counts) 9 s, the viewer 11 s, the results NeXus file 5 s.

Measured again (issue 14, 5 frames/s on the 200-frame Eiger scan) on the same 2-core AMD EPYC,
one core taken by a 1-thread CPU training job, ``OMP_NUM_THREADS=1``; the mean of two rounds,
before and after alternating (peak RSS: the larger), before and after each frame was decompressed
once and kept packed for the later passes (``open_scan(cache_bytes=...)``, up to
``pipeline.SCAN_CACHE_BYTES``), frames went to the classical finder and the peak table one
Eiger frame at a time (``pipeline.READ_BYTES``: no 143 MB batch mapped fresh each time), the
label images were handled as their labelled pixels (``volume.SparseFrames``: peak linking and
table, the viewer's voxels and outlines, the NeXus chunks; the classical-only run's joint
volume reuses the classical chunks), and the viewer's traces went into the figure without a
second validation. Outputs unchanged (peak CSV and viewer byte for byte, NeXus file to its
stored chunks, time stamps aside):

    scan           frames   before                  after
    Pilatus 100K      100     7.3 s  13.7/s  1.22     7.0 s  14.3/s  1.19
    Pilatus 100K     1000    16.2 s  61.8/s  1.06    15.4 s  64.9/s  1.18
    Eiger 4M           20    13.8 s  1.45/s  1.61    10.1 s  1.97/s  1.53
    Eiger 4M          200    56.5 s  3.54/s  2.12    37.2 s  5.38/s  2.61

Of the 37 s of the 200-frame Eiger run now: importing torch and torchvision 3.4 s (the classical
path needs neither), prediction 23.5 s (the process gets about one core: the finder, about
60 ms a frame alone, shares it with the reader thread decompressing, about 40 ms a frame, and
filling bad pixels), the peak table 2.1 s, the viewer 5.0 s, the results NeXus file 2.7 s.

Then the classical path stopped importing torch and torchvision (``dipid.predict`` imports them
only where a network runs). One run, ``--eiger 200 --pilatus 100 1000 --models classical``, the
other core idle this time (so not comparable row for row with the tables above):

    scan           frames   wall     frames/s  peak RSS GB
    Pilatus 100K      100    3.7 s     27.1       0.52
    Pilatus 100K     1000   12.9 s     77.5       0.46
    Eiger 4M          200   26.2 s      7.6       1.94

Joint with the shipped weights and settings (100 proposals, classical gate, 96-px peak windows),
``--pilatus 100 1000 --eiger 20 --models joint``, the other core busy with tests. Two rounds for
Pilatus: before and after ``predict_scan`` trimmed the C heap once its RSS had grown 256 MB
(``dipid._memory``):

    scan           frames   wall      frames/s  peak RSS GB (before / after the trim)
    Pilatus 100K      100    45-55 s    1.8-2.3    2.14 / 2.06
    Pilatus 100K     1000   407-531 s   1.9-2.5    2.92 / 2.41
    Eiger 4M           20   475 s       0.042      3.66 / -

The 1000-frame run's higher peak comes from busier frames, not from frames kept. In-process, on
the 1000-frame scan, the peak RSS reached 1.25 GB over frames 0-99 and 1.66-1.83 GB over frames
100-399, and whole frames without windows reached 1.48 and 1.65 GB on those two stretches. The
RSS after each 100-frame stretch grew by 110 MB over 400 frames, 34 MB of it the results
themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dipid.tables import text_table

DETECTORS = {"pilatus": "pilatus100k", "eiger": "eiger4m"}

#: The parent of each measured process: runs the command given, prints wall seconds and the
#: child's peak RSS (Linux reports ru_maxrss in KiB) as JSON.
_MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": proc.returncode, "wall": wall, "rss": rss, "tail": (proc.stdout + proc.stderr)[-1500:]}))
"""


def make_scan(work: Path, detector: str, frames: int, seed: int) -> Path:
    """Simulate (once) a scan of ``frames`` frames in a subprocess; returns its NeXus file."""
    name = f"{detector}_{frames}_s{seed}"
    path = work / "scans" / f"{name}.nxs"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    code = ("import sys; from dipid.synth import simulate_scan; "
            "simulate_scan(n_frames=int(sys.argv[1]), detector=sys.argv[2], seed=int(sys.argv[3]))"
            ".write(sys.argv[4], sys.argv[5])")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(frames), DETECTORS[detector], str(seed), str(path.parent), name],
                   check=True)
    print(f"simulated {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return path


def measure(scan: Path, out: Path, model: str, weights: str | None, timeout: float) -> dict:
    """Run one `dipid predict` in a fresh process; wall s, peak RSS bytes, viewer bytes."""
    dipid = Path(sys.executable).with_name("dipid")
    command = [str(dipid), "predict", "--model", model, str(scan), "--out", str(out), "--overwrite",
               "--device", "cpu"]
    if weights:
        command += ["--weights", weights]
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, timeout=timeout)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    viewer = out / f"{scan.stem}_view.html"
    result["viewer"] = viewer.stat().st_size if viewer.is_file() else 0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pilatus", type=int, nargs="*", default=[100, 1000], help="Pilatus 100K scan lengths")
    parser.add_argument("--eiger", type=int, nargs="*", default=[20, 200], help="Eiger 4M scan lengths")
    parser.add_argument("--models", nargs="+", default=["classical", "joint"], help="classical and/or joint")
    parser.add_argument("--weights", default=None, help="folder with tlm/sslm.safetensors for the joint rows")
    parser.add_argument("--work", type=Path, default=Path("benchmark-scale"), help="scans and outputs (reused)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one prediction may take")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    shipped = Path(__file__).resolve().parents[1] / "weights"
    weights_dir = Path(args.weights) if args.weights else shipped
    has_weights = any(weights_dir.glob("*.safetensors"))
    rows, skipped = [], []
    configs = [("pilatus", n) for n in args.pilatus] + [("eiger", n) for n in args.eiger]
    for model in args.models:
        if model == "joint" and not has_weights:
            skipped.append(f"joint: skipped, no trained weights in {weights_dir} (pass --weights FOLDER)")
            continue
        for detector, frames in configs:
            scan = make_scan(args.work, detector, frames, args.seed)
            out = args.work / "out" / f"{model}_{scan.stem}"
            try:
                res = measure(scan, out, model, args.weights if model == "joint" else None, args.timeout)
            except subprocess.TimeoutExpired:
                skipped.append(f"{model} {detector} {frames}: over --timeout {args.timeout:.0f} s")
                continue
            if res["rc"] != 0:
                skipped.append(f"{model} {detector} {frames}: failed (exit {res['rc']}): {res['tail']}")
                continue
            rows.append([f"{DETECTORS[detector]} ({model})", frames, res["wall"], frames / res["wall"],
                         res["rss"] / 1e9, res["viewer"] / 1e6])
            print(f"  {rows[-1][0]:26s} {frames:5d} frames  {res['wall']:7.1f} s  {res['rss'] / 1e9:5.2f} GB",
                  file=sys.stderr, flush=True)
    print(text_table(["scan", "frames", "wall s", "frames/s", "peak RSS GB", "viewer MB"], rows))
    for line in skipped:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
