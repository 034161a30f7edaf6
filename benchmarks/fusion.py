"""Is ``joint`` at least as good as the better of the TLM and the SSLM? Fusion rules compared.

The TLM and the SSLM run once over every frame of two simulated sets: a validation set (its own
seeds) on which the fusion settings are chosen, and the benchmark test set of
``benchmarks/accuracy.py`` on which they are reported. Fusing cached outputs is cheap, so every
rule in the grid is scored on both sets without running the networks again.

A rule is acceptable on a set when its mean IoU and instance F1 are both >= those of the better
single model; among acceptable rules the one with the best (mean IoU + F1) on validation wins.

    python benchmarks/fusion.py --weights runs/joint          # a folder with tlm/sslm.safetensors
    python benchmarks/fusion.py --weights runs/joint --write-settings   # store the chosen rule
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import build_test_set  # noqa: E402

#: Base seed of the fusion validation set (the test set uses accuracy.TEST_SEED).
VAL_SEED = 20_261_207
METRICS = ("mean_iou", "precision", "recall", "f1", "hit_auc")
#: Scores an unconfirmed TLM instance / SSLM component needs to stay in `joint` (above 1: never).
TLM_MIN_SCORES = (0.0, 0.7, 0.9, 1.01)
#: (score, area) an unconfirmed SSLM component needs to join `joint` (score above 1: never).
SSL_MINIMA = ((0.5, 0), (0.9, 0), (0.5, 50), (0.5, 200), (1.01, 0))
#: None: TLM masks as they are; else confirmed instances take SSLM edges this far around them.
REFINE_MARGINS = (None, 2, 8)


def run_models(predictor, label_files: list[Path], batch_size: int) -> dict:
    """Truth, valid pixels and the TLM/SSLM outputs of every labelled frame."""
    import numpy as np
    from tqdm.auto import tqdm

    from dipid.evaluate import iter_labelled_batches, load_label_sets

    cache = {"gt": [], "valid": [], "tlm": [], "ssl": []}
    label_sets = load_label_sets(label_files)
    with tqdm(total=sum(len(ls) for ls in label_sets), desc="predict", unit="frame") as bar:
        for _, chunk, counts, bad in iter_labelled_batches(label_sets, batch_size):
            results = predictor.predict_frames(counts, bad_pixels=bad, keep_probability=False)
            for fl, bad_k, res in zip(chunk, bad, results):
                cache["gt"].append(fl.masks())
                cache["valid"].append(~np.asarray(bad_k))
                cache["tlm"].append(res.tlm)
                cache["ssl"].append(res.ssl.instances)
            bar.update(len(chunk))
    return cache


def score(cache: dict, preds: list) -> dict[str, float]:
    from dipid.metrics import evaluate_frames

    return evaluate_frames(cache["gt"], [(p.masks, p.scores) for p in preds], valid=cache["valid"])


def fuse_all(cache: dict, settings) -> list:
    from dipid.postprocess import fuse_instances
    from dipid.results import Instances

    out = []
    for tlm, ssl in zip(cache["tlm"], cache["ssl"]):
        masks, scores, sources = fuse_instances(tlm.masks, tlm.scores, ssl.masks, ssl.scores,
                                                **settings.fusion_options())
        out.append(Instances.from_masks(masks, scores, sources))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="folder with tlm.safetensors and sslm.safetensors")
    parser.add_argument("--data", type=Path, default=Path(".cache/dipid-testset"))
    parser.add_argument("--val-scans", type=int, default=6)
    parser.add_argument("--test-scans", type=int, default=6)
    parser.add_argument("--frames", type=int, default=31)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show", type=int, default=6, help="fusion rules shown, best on validation first")
    parser.add_argument("--write-settings", action="store_true",
                        help="write the chosen rule to settings.json in the weights folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from dipid.predict import JointPredictor, PredictorSettings

    # the models' own outputs do not depend on the fusion settings; defaults make the "default" row
    predictor = JointPredictor.from_pretrained(args.weights, device=args.device, settings=PredictorSettings())
    if predictor.tlm is None or predictor.sslm is None:
        print(f"{args.weights}: needs both a TLM and an SSLM checkpoint", file=sys.stderr)
        return 2
    defaults = PredictorSettings()
    sets = {
        "val": build_test_set(args.data / f"val-{args.val_scans}x{args.frames}", n_scans=args.val_scans,
                              n_frames=args.frames, base_seed=VAL_SEED, prefix="val"),
        "test": build_test_set(args.data / f"{args.test_scans}x{args.frames}", n_scans=args.test_scans, n_frames=args.frames),
    }
    caches = {name: run_models(predictor, files, args.batch_size) for name, files in sets.items()}

    rules = {"default": defaults}
    for tlm_min, (ssl_min, ssl_area), margin in itertools.product(TLM_MIN_SCORES, SSL_MINIMA, REFINE_MARGINS):
        ssl_rule = f"{ssl_min},{ssl_area}px" if ssl_min <= 1 else "never"
        name = f"tlm>={tlm_min if tlm_min <= 1 else 'never'} ssl>={ssl_rule} refine={'no' if margin is None else margin}"
        rules[name] = replace(defaults, fusion_tlm_min_score=tlm_min, fusion_ssl_min_score=min(ssl_min, 1.0),
                              fusion_ssl_min_area=ssl_area, fusion_add_unmatched_ssl=ssl_min <= 1,
                              fusion_refine_with_ssl=margin is not None, fusion_refine_margin=margin or 0)

    table: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, cache in caches.items():
        table[set_name] = {"tlm": score(cache, cache["tlm"]), "ssl": score(cache, cache["ssl"])}
        for rule_name, rule in rules.items():
            table[set_name][f"joint {rule_name}"] = score(cache, fuse_all(cache, rule))

    def acceptable(set_name: str, row: dict[str, float]) -> bool:
        best = {m: max(table[set_name]["tlm"][m], table[set_name]["ssl"][m]) for m in ("mean_iou", "f1")}
        return all(row[m] >= best[m] - 1e-9 for m in best)

    def merit(name: str) -> float:
        return table["val"][name]["mean_iou"] + table["val"][name]["f1"]

    joint_rows = sorted((r for r in table["val"] if r.startswith("joint")), key=merit, reverse=True)
    chosen = next((r for r in joint_rows if acceptable("val", table["val"][r])), None)
    shown = ["tlm", "ssl", "joint default", *[r for r in joint_rows if r != "joint default"][: args.show]]

    print(f"\nweights {args.weights}; val {args.val_scans} and test {args.test_scans} scans x {args.frames} frames; "
          f"{os.cpu_count()} CPU cores ({platform.machine()})\n")
    header = f"{'set':5s} {'model':38s}" + "".join(f"{c:>10s}" for c in METRICS) + "  >= best single"
    print(header)
    print("-" * len(header))
    for set_name, rows in table.items():
        for model in shown:
            row = rows[model]
            mark = ("yes" if acceptable(set_name, row) else "no") if model.startswith("joint") else ""
            star = " *" if model.removeprefix("joint ") == (chosen or "").removeprefix("joint ") and model.startswith("joint") else ""
            print(f"{set_name:5s} {model + star:38s}" + "".join(f"{row[c]:10.3f}" for c in METRICS) + f"  {mark}")
    print(f"\n{len(rules)} rules tried; shown: the single models, the default rule and the {args.show} best on "
          f"validation (mean IoU + F1).\n* chosen on validation: {chosen or 'none acceptable'}")
    if args.write_settings and chosen:
        from dipid.io.coco import atomic_write_text
        from dipid.predict import SETTINGS_FILE

        rule = asdict(rules[chosen.removeprefix("joint ")])
        tuned = {name: value for name, value in rule.items() if name.startswith("fusion_")}
        path = atomic_write_text(Path(args.weights) / SETTINGS_FILE, json.dumps(tuned, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
