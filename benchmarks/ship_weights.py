"""Put trained checkpoints into ``weights/``: compressed, checksummed, and checked against fp32.

The fp32 ResNet-50 Mask R-CNN is 176 MB; shipped weights must stay under 50 MB a file so the
repository stays easy to clone. The TLM is stored as per-output-channel int8 with float32 scales
(:func:`dipid.models.tensorfile.quantize_per_channel`, dequantised at load, no side file); the
SSLM is small and is stored as float32 unless ``--sslm-dtype`` says otherwise. The script then
scores the fp32 and the stored TLM on the same test frames (the accuracy benchmark's test set)
and prints both rows, so the card can show the stored model is within 0.005 mean IoU of fp32.

    python benchmarks/ship_weights.py --tlm RUN/best.safetensors --sslm RUN2/best.safetensors
    python benchmarks/ship_weights.py --tlm ... --sslm ... --out weights --check-scans 6 --check-frames 31

Writes ``OUT/tlm.safetensors``, ``OUT/sslm.safetensors`` and ``OUT/SHA256SUMS`` (every file in
OUT but the checksum file and README.md); ``settings.json`` comes from ``benchmarks/fusion.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

_DTYPES = {"int8": torch.int8, "float16": torch.float16, "float32": None}


def store(source: Path, target: Path, dtype: torch.dtype | None) -> Path:
    """Re-save checkpoint ``source`` as ``target`` in ``dtype``, keeping its metadata."""
    from dipid.models import load_checkpoint, read_checkpoint_metadata, save_checkpoint

    header = read_checkpoint_metadata(source)
    model = load_checkpoint(source)
    metadata = {**header["metadata"], "shipped_from": str(source), "stored_dtype": str(dtype or "float32")}
    return save_checkpoint(model, target, metadata=metadata, dtype=dtype)


def write_sha256sums(folder: Path) -> Path:
    """``SHA256SUMS`` over the shipped files of ``folder`` (sha256sum's format)."""
    from dipid.models import sha256_file

    names = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and p.name not in ("SHA256SUMS", "README.md") and not p.name.startswith("."))
    path = folder / "SHA256SUMS"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{sha256_file(folder / n)}  {n}\n" for n in names))
    tmp.replace(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tlm", type=Path, default=None, help="TLM checkpoint (a run's best.safetensors)")
    parser.add_argument("--sslm", type=Path, default=None, help="SSLM checkpoint")
    parser.add_argument("--out", type=Path, default=Path("weights"))
    parser.add_argument("--tlm-dtype", default="int8", choices=sorted(_DTYPES))
    parser.add_argument("--sslm-dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--data", type=Path, default=Path(".cache/dipid-testset"), help="accuracy test-set folder")
    parser.add_argument("--check-scans", type=int, default=6, help="test scans for the fp32 vs stored check (0: skip)")
    parser.add_argument("--check-frames", type=int, default=31)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from accuracy import build_test_set

    from dipid.evaluate import evaluate
    from dipid.models.weights import SETTINGS_FILE, WEIGHT_FILES
    from dipid.predict import JointPredictor, PredictorSettings, read_settings

    args.out.mkdir(parents=True, exist_ok=True)
    shipped = {}
    for kind, source, dtype in (("tlm", args.tlm, args.tlm_dtype), ("sslm", args.sslm, args.sslm_dtype)):
        if source is None:
            continue
        target = store(source, args.out / WEIGHT_FILES[kind], _DTYPES[dtype])
        shipped[kind] = (source, target)
        print(f"{kind}: {source} ({source.stat().st_size / 1e6:.1f} MB) -> {target} "
              f"({target.stat().st_size / 1e6:.1f} MB, {dtype})")
    print(f"wrote {write_sha256sums(args.out)}")

    if args.tlm is not None and args.check_scans > 0:
        labels = build_test_set(args.data / f"{args.check_scans}x{args.check_frames}", n_scans=args.check_scans,
                                n_frames=args.check_frames)
        print(f"\nfp32 vs stored TLM on {args.check_scans} x {args.check_frames} test frames (CPU):")
        print(f"{'TLM':10s}{'mean_iou':>10s}{'f1':>10s}{'AP':>10s}")
        rows = {}
        settings_path = args.out / SETTINGS_FILE  # the threshold the shipped TLM runs at, when chosen
        settings = PredictorSettings(**read_settings(settings_path)) if settings_path.is_file() else PredictorSettings()
        print(f"(TLM threshold {settings.threshold}{' from ' + str(settings_path) if settings_path.is_file() else ''})")
        for name, path in (("fp32", shipped["tlm"][0]), ("stored", shipped["tlm"][1])):
            predictor = JointPredictor.from_pretrained(path, device="cpu", settings=settings)
            row = evaluate(predictor, labels, models=["tlm"], progress=False).summary["tlm"]
            rows[name] = row
            print(f"{name:10s}{row['mean_iou']:10.4f}{row['f1']:10.4f}{row['AP']:10.4f}")
        gap = abs(rows["fp32"]["mean_iou"] - rows["stored"]["mean_iou"])
        print(f"mean IoU difference: {gap:.4f} ({'within' if gap <= 0.005 else 'OVER'} the 0.005 budget)")
        return 0 if gap <= 0.005 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
