"""Frames per second of dipid's pipelines against a DiPID-style baseline, on the CPU and CUDA.

The baseline is written here from the original DiPID's description: it reopens the NeXus file for
every frame, feeds one frame at a time to a torchvision Mask R-CNN with the default transform
(which upscales a 195 x 487 frame to about 534 x 1333) and a 3-channel replicated input.
dipid's pipelines read in chunks on a background thread, batch frames, keep frames at their size
and use a single-channel stem.

Each measurement runs in a fresh subprocess so its peak memory (CPU: max RSS; CUDA: max
allocated) is its own. Weights: ``--weights`` (a folder with tlm/sslm.safetensors), else the
shipped ones when present, else random initialisation. The weights matter for speed through the
number of detections: a randomly initialised TLM scores every proposal about 0.5 and so returns
its maximum of 100 detections a frame, each through the mask head, where a trained one returns a
few; the table's ``det/frame`` column shows it. With ``--weights`` the baseline runs the same TLM
weights DiPID-style (RGB-replicated input, ImageNet mean/std, 800-px resize).

    python benchmarks/throughput.py                       # CPU, and CUDA when present
    python benchmarks/throughput.py --devices cpu --frames 61 --baseline-frames 4
    python benchmarks/throughput.py --weights runs/joint  # trained checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("dipid-baseline", "tlm", "ssl", "joint", "classical")


def _make_scan(folder: Path, frames: int) -> Path:
    from dipid.synth import simulate_scan

    return simulate_scan(n_frames=frames, preset="realistic", seed=11).write(folder, "bench").nexus


def _predictor(device: str, weights: str | None, proposals: int | None):
    from dipid.errors import WeightsNotFoundError
    from dipid.models import build_sslm, build_tlm
    from dipid.predict import JointPredictor, PredictorSettings

    settings = PredictorSettings(proposals=proposals) if proposals else None
    if weights:
        return JointPredictor.from_pretrained(weights, device=device, settings=settings), Path(weights).name
    try:
        return JointPredictor.from_pretrained(device=device, settings=settings), "shipped"
    except WeightsNotFoundError:
        return JointPredictor(tlm=build_tlm(), sslm=build_sslm(), device=device, settings=settings), "random-init"


def _baseline_model(weights: str | None):
    """(torchvision Mask R-CNN as DiPID ran it, weights label)."""
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    if not weights:
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        model.roi_heads.box_predictor = FastRCNNPredictor(1024, 2)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(256, 256, 2)
        return model, "random-init"
    from dipid.models import load_checkpoint

    model = load_checkpoint(Path(weights) / "tlm.safetensors").net
    grey = model.backbone.body.conv1
    rgb = torch.nn.Conv2d(3, grey.out_channels, grey.kernel_size, stride=grey.stride, padding=grey.padding, bias=False)
    with torch.no_grad():  # a third of the grey kernel per channel: the same response to a grey RGB image
        rgb.weight.copy_(grey.weight.repeat(1, 3, 1, 1) / 3)
    model.backbone.body.conv1 = rgb
    model.transform = GeneralizedRCNNTransform(800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    model.roi_heads.score_thresh = 0.05
    model.rpn._post_nms_top_n["testing"] = 1000
    return model, Path(weights).name


def _baseline(scan_path: Path, frames: int, device: str, weights: str | None) -> dict:
    """DiPID-style: per-frame file open, default 800-px resize, one frame at a time."""
    import h5py
    import hdf5plugin  # noqa: F401
    import numpy as np
    import torch

    model, label = _baseline_model(weights)
    model.eval().to(device)
    detections = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(frames):
            with h5py.File(scan_path, "r") as f:  # reopened for every image, as the original did
                frame = f["entry/instrument/pil3_100k/data"][i].astype(np.float32)
            frame = np.log1p(np.clip(frame, 0, None))
            frame = frame / max(frame.max(), 1e-6)
            image = torch.from_numpy(np.repeat(frame[None], 3, axis=0)).to(device)
            out = model([image])[0]
            keep = out["scores"] >= 0.4
            _ = (out["masks"][keep] > 0.5).cpu().numpy()
            detections += int(keep.sum())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"frames": frames, "seconds": time.perf_counter() - start, "weights": label,
            "detections": detections / frames}


def _dipid(mode: str, scan_path: Path, frames: int, device: str, batch_size: int, weights: str | None,
           proposals: int | None) -> dict:
    import torch

    predictor, weights = _predictor(device, weights, proposals)
    # warm-up: first CUDA/cuDNN calls and thread pools are not part of the steady rate
    predictor.predict_scan(scan_path, end_val=min(batch_size, frames), batch_size=batch_size, progress=False, models=mode)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = predictor.predict_scan(scan_path, end_val=frames, batch_size=batch_size, progress=False, models=mode)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    detections = sum(len(frame.instances(mode)) for frame in result) / frames
    return {"frames": frames, "seconds": seconds, "weights": weights, "detections": detections}


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.mode == "dipid-baseline":
        out = _baseline(Path(args.scan), args.frames, args.device, args.weights)
    else:
        out = _dipid(args.mode, Path(args.scan), args.frames, args.device, args.batch_size, args.weights,
                     args.proposals)
    out["peak_mem_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    parser.add_argument("--frames", type=int, default=61, help="frames per dipid measurement")
    parser.add_argument("--baseline-frames", type=int, default=4, help="frames for the (slow) baseline on the CPU")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--weights", default=None, help="folder with tlm.safetensors/sslm.safetensors")
    parser.add_argument("--proposals", type=int, default=0, help="TLM proposals per frame (0: the predictor's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--scan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scan = _make_scan(Path(tmp), max(args.frames, args.baseline_frames))
        for device in devices:
            for mode in args.modes:
                frames = args.baseline_frames if (mode == "dipid-baseline" and device == "cpu") else args.frames
                cmd = [sys.executable, __file__, "--child", "--mode", mode, "--device", device, "--scan", str(scan),
                       "--frames", str(frames), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                       "--proposals", str(args.proposals)] + (["--weights", args.weights] if args.weights else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    rows.append({"device": device, "mode": mode, "error": "failed"})
                    continue
                res = json.loads(line[7:])
                res.update(device=device, mode=mode, fps=res["frames"] / res["seconds"])
                rows.append(res)
                print(f"  {device:5s} {mode:15s} {res['fps']:8.2f} frames/s", file=sys.stderr)

    print(f"\nthroughput on {_hardware(devices)}; 195 x 487 frames; batch size {args.batch_size}\n")
    header = (f"{'device':6s} {'mode':15s} {'frames':>6s} {'seconds':>8s} {'frames/s':>9s} {'x baseline':>10s} "
              f"{'peak MB':>8s} {'det/frame':>9s} weights")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['device']:6s} {row['mode']:15s} failed")
            continue
        base = next((r for r in rows if r["device"] == row["device"] and r["mode"] == "dipid-baseline" and "fps" in r), None)
        ratio = f"{row['fps'] / base['fps']:10.1f}" if base else f"{'-':>10s}"
        print(f"{row['device']:6s} {row['mode']:15s} {row['frames']:6d} {row['seconds']:8.2f} {row['fps']:9.2f} "
              f"{ratio} {row['peak_mem_mb']:8.0f} {row['detections']:9.1f} {row['weights']}")


def _hardware(devices: list[str]) -> str:
    import platform

    import torch

    parts = [f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"]
    if "cuda" in devices and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    return "; ".join(parts)


if __name__ == "__main__":
    main()
