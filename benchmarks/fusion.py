"""Is ``joint`` at least as good as every single model (TLM, SSLM, classical)? Fusion rules compared.

The TLM, the SSLM and the classical finder run once over every frame of two simulated sets: a
validation set (its own seeds) on which the fusion settings are chosen, and the benchmark test
set of ``benchmarks/accuracy.py`` on which they are reported. Fusing cached outputs is cheap, so
every rule in the grid is scored on both sets without running the networks again. The grid
includes rules that use the classical finder as a third source (confirmation, added peaks, a
two-of-three vote with the SSLM,
pixel edges) and rules with the classical finder as the anchor, whose peaks the networks confirm,
rank and complete; see :func:`dipid.postprocess.fuse_instances`).

A rule is acceptable on a set when its mean IoU, instance F1 and mask AP are all >= those of
every single model (on validation: >= theirs minus ``--tolerance``, 0.005 by default, the size
of difference a few hundred frames cannot tell apart); among acceptable rules the one with the best (mean IoU + F1 + AP) on
validation wins. When none is acceptable the best by that sum is reported (and written with
``--write-settings``), marked as such.

    python benchmarks/fusion.py --weights runs/joint          # a folder with tlm/sslm.safetensors
    python benchmarks/fusion.py --weights runs/joint --write-settings   # store the chosen rule
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import build_test_set  # noqa: E402

#: Base seed of the fusion validation set (the test set uses accuracy.TEST_SEED).
VAL_SEED = 20_261_207
METRICS = ("mean_iou", "precision", "recall", "f1", "AP", "hit_auc", "fp_area_per_empty_frame")
#: The columns joint must match or beat on every single model.
GATE = ("mean_iou", "f1", "AP")
SINGLE_MODELS = ("tlm", "ssl", "classical")
#: TLM confidence thresholds tried (PredictorSettings.threshold: the TLM row and joint's TLM input).
#: The TLM outputs are cached once at CACHE_THRESHOLD and filtered for each.
THRESHOLDS = (0.4, 0.6, 0.8)
CACHE_THRESHOLD = 0.3
#: Scores an unconfirmed TLM instance needs to stay in `joint` (above 1: never).
TLM_MIN_SCORES = (0.0, 0.9, 1.01)
#: (score, area) an unconfirmed SSLM component needs to join `joint` (score above 1: never).
SSL_MINIMA = ((0.5, 50), (0.9, 0), (1.01, 0))
#: None: TLM masks as they are; else confirmed instances take SSLM (or classical) edges this far around them.
REFINE_MARGINS = (None, 2)


class ClassicalMode(NamedTuple):
    """How the classical finder joins `joint` (with the lone-instance rules off, ``agree`` makes
    `joint` a two-of-three vote: PredictorSettings.fusion_add_agreeing)."""

    min_score: float  # of an added classical-only peak; above 1: none added
    edges: bool       # confirmed instances take the classical pixel edges
    agree: bool       # an agreeing SSLM component + classical peak join without the TLM (the vote)


#: None: the classical finder does not join at all.
CLASSICAL_MODES = (None, ClassicalMode(1.01, False, False), ClassicalMode(0.5, False, False),
                   ClassicalMode(0.75, False, False), ClassicalMode(0.75, True, False),
                   ClassicalMode(1.01, True, True), ClassicalMode(0.9, True, True))
#: With the classical finder as the anchor: the score a classical peak no network confirms needs
#: to stay (0: every peak stays; above 1: the networks veto every peak they do not confirm).
CLASSICAL_KEEP_SCORES = (0.0, 0.75, 0.9, 0.97, 1.01)
#: ... and the score a TLM instance that confirms no classical peak needs to join (above 1: never).
TLM_ADD_SCORES = (0.9, 1.01)


def make_rules(defaults) -> dict:
    """name -> PredictorSettings: the default and every rule of the grid."""
    rules = {"default": defaults}
    grid = itertools.product(THRESHOLDS, TLM_MIN_SCORES, SSL_MINIMA, REFINE_MARGINS, CLASSICAL_MODES)
    for threshold, tlm_min, (ssl_min, ssl_area), margin, classical in grid:
        if classical is not None and classical.edges and margin is None:
            continue  # classical edges need a refine margin
        ssl_rule = f"{ssl_min},{ssl_area}px" if ssl_min <= 1 else "never"
        cl_rule = "no" if classical is None else (
            ("vote+" if classical.agree else "") + ("confirm" if classical.min_score > 1 else f"add>={classical.min_score}")
            + ("+edges" if classical.edges else ""))
        name = (f"t={threshold} tlm>={tlm_min if tlm_min <= 1 else 'never'} ssl>={ssl_rule} "
                f"refine={'no' if margin is None else margin} cl={cl_rule}")
        rules[name] = replace(defaults, threshold=threshold, fusion_tlm_min_score=tlm_min,
                              fusion_ssl_min_score=min(ssl_min, 1.0),
                              fusion_ssl_min_area=ssl_area, fusion_add_unmatched_ssl=ssl_min <= 1,
                              fusion_refine_with_ssl=margin is not None, fusion_refine_margin=margin or 0,
                              fusion_classical=classical is not None,
                              fusion_classical_min_score=min(classical.min_score, 1.0) if classical else 0.5,
                              fusion_add_unmatched_classical=bool(classical and classical.min_score <= 1),
                              fusion_refine_with_classical=bool(classical and classical.edges),
                              fusion_add_agreeing=bool(classical and classical.agree))
    grid = itertools.product(THRESHOLDS, CLASSICAL_KEEP_SCORES, TLM_ADD_SCORES, SSL_MINIMA, (False, True))
    for threshold, keep, tlm_add, (ssl_min, ssl_area), agree in grid:
        ssl_rule = f"{ssl_min},{ssl_area}px" if ssl_min <= 1 else "never"
        name = (f"t={threshold} anchor=classical keep>={keep if keep <= 1 else 'confirmed'} "
                f"tlm+>={tlm_add if tlm_add <= 1 else 'never'} ssl+>={ssl_rule}{' +agree' if agree else ''}")
        rules[name] = replace(defaults, threshold=threshold, fusion_anchor="classical", fusion_classical=True,
                              fusion_classical_min_score=keep, fusion_tlm_min_score=tlm_add,
                              fusion_ssl_min_score=min(ssl_min, 1.0), fusion_ssl_min_area=ssl_area,
                              fusion_add_unmatched_ssl=ssl_min <= 1, fusion_refine_with_ssl=False,
                              fusion_refine_with_classical=False, fusion_add_agreeing=agree)
    return rules


def run_models(predictor, label_files: list[Path], batch_size: int) -> dict:
    """Truth, valid pixels and the TLM/SSLM outputs of every labelled frame."""
    import numpy as np
    from tqdm.auto import tqdm

    from dipid.evaluate import iter_labelled_batches, load_label_sets

    cache = {"gt": [], "valid": [], "tlm": [], "ssl": [], "classical": []}
    label_sets = load_label_sets(label_files)
    with tqdm(total=sum(len(ls) for ls in label_sets), desc="predict", unit="frame") as bar:
        for _, chunk, counts, bad in iter_labelled_batches(label_sets, batch_size):
            results = predictor.predict_frames(counts, bad_pixels=bad, keep_probability=False,
                                               models=("tlm", "ssl", "classical"))
            for fl, bad_k, res in zip(chunk, bad, results):
                cache["gt"].append(fl.masks())
                cache["valid"].append(~np.asarray(bad_k))
                cache["tlm"].append(res.tlm)
                cache["ssl"].append(res.ssl.instances)
                cache["classical"].append(res.classical)
            bar.update(len(chunk))
    return cache


def score(cache: dict, preds: list) -> dict[str, float]:
    from dipid.metrics import evaluate_frames

    return evaluate_frames(cache["gt"], [(p.masks, p.scores) for p in preds], valid=cache["valid"], coco_ap=True)


def tlm_at(cache: dict, threshold: float) -> list:
    """The cached TLM instances with score >= threshold."""
    return [tlm[tlm.scores >= threshold] for tlm in cache["tlm"]]


def fuse_all(cache: dict, settings) -> list:
    from dipid.postprocess import fuse_instances
    from dipid.results import Instances

    out = []
    for tlm, ssl, classical in zip(tlm_at(cache, settings.threshold), cache["ssl"], cache["classical"]):
        third = classical if settings.fusion_classical else None
        masks, scores, sources = fuse_instances(tlm.masks, tlm.scores, ssl.masks, ssl.scores,
                                                **settings.fusion_options(),
                                                classical_masks=None if third is None else third.masks,
                                                classical_scores=None if third is None else third.scores)
        out.append(Instances.from_masks(masks, scores, sources))
    return out


#: Cached model outputs per set, shared with the scoring processes (forked).
_CACHES: dict = {}


def _score_rule(job: tuple) -> dict[str, float]:
    set_name, settings = job
    return score(_CACHES[set_name], fuse_all(_CACHES[set_name], settings))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="folder with tlm.safetensors and sslm.safetensors")
    parser.add_argument("--data", type=Path, default=Path(".cache/dipid-testset"))
    parser.add_argument("--val-scans", type=int, default=8)
    parser.add_argument("--val-presets", default="easy,realistic,hard,broad",
                        help="presets of the validation scans, in turn (the test set keeps accuracy.py's)")
    parser.add_argument("--anchors", default="tlm,classical", help="which fusion anchors' rules to try")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="on validation, how far below a single model a rule may stay on a gate column")
    parser.add_argument("--all-rules", type=Path, default=None, help="also write every rule's validation row here")
    parser.add_argument("--test-scans", type=int, default=6)
    parser.add_argument("--frames", type=int, default=31)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show", type=int, default=6, help="fusion rules shown, best on validation first")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes scoring the rules")
    parser.add_argument("--write-settings", action="store_true",
                        help="write the chosen rule to settings.json in the weights folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from dipid.predict import JointPredictor, PredictorSettings

    # The models' own outputs do not depend on the fusion settings; the TLM's are cached at a low
    # threshold and filtered for each rule.
    predictor = JointPredictor.from_pretrained(args.weights, device=args.device,
                                               settings=PredictorSettings(threshold=CACHE_THRESHOLD))
    if predictor.tlm is None or predictor.sslm is None:
        print(f"{args.weights}: needs both a TLM and an SSLM checkpoint", file=sys.stderr)
        return 2
    defaults = PredictorSettings()
    val_presets = tuple(args.val_presets.split(","))
    sets = {
        "val": build_test_set(args.data / f"val-{'-'.join(val_presets)}-{args.val_scans}x{args.frames}",
                              n_scans=args.val_scans, n_frames=args.frames, base_seed=VAL_SEED, prefix="val",
                              presets=val_presets),
        "test": build_test_set(args.data / f"{args.test_scans}x{args.frames}", n_scans=args.test_scans, n_frames=args.frames),
    }
    global _CACHES
    _CACHES = {name: run_models(predictor, files, args.batch_size) for name, files in sets.items()}
    anchors = set(args.anchors.split(","))
    rules = {name: rule for name, rule in make_rules(defaults).items()
             if name == "default" or rule.fusion_anchor in anchors}

    def singles(set_name: str) -> dict[str, dict[str, float]]:
        cache = _CACHES[set_name]
        rows = {f"tlm@{t}": score(cache, tlm_at(cache, t)) for t in THRESHOLDS}
        rows.update({m: score(cache, cache[m]) for m in ("ssl", "classical")})
        return rows

    # Every rule on validation (in parallel: fusing and scoring is numpy on cached outputs).
    table = {"val": singles("val"), "test": singles("test")}
    names = list(rules)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for name, row in zip(names, pool.map(_score_rule, [("val", rules[n]) for n in names], chunksize=4)):
            table["val"][f"joint {name}"] = row

    # On validation a rule may trail a single model by the tolerance (differences this small are
    # scan-to-scan noise on a few hundred frames); the test rows are judged strictly.
    def acceptable(set_name: str, rule_name: str) -> bool:
        tolerance = args.tolerance if set_name == "val" else 1e-9
        rule = rules[rule_name.removeprefix("joint ")]
        rows = table[set_name]
        best = {m: max(rows[f"tlm@{rule.threshold}"][m] if f"tlm@{rule.threshold}" in rows else 0.0,
                       rows["ssl"][m], rows["classical"][m]) for m in GATE}
        return all(rows[rule_name][m] >= best[m] - tolerance for m in GATE)

    def merit(name: str) -> float:
        return sum(table["val"][name][m] for m in GATE)

    joint_rows = sorted((r for r in table["val"] if r.startswith("joint")), key=merit, reverse=True)
    chosen = next((r for r in joint_rows if acceptable("val", r)), None)
    fallback = chosen is None
    if fallback:
        chosen = joint_rows[0]
    top = [r for r in joint_rows if r != "joint default"][: args.show]
    for name in dict.fromkeys(["joint default", chosen, *top]):  # the test set: only the rows shown
        table["test"][name] = _score_rule(("test", rules[name.removeprefix("joint ")]))
    shown = [*(f"tlm@{t}" for t in THRESHOLDS), "ssl", "classical", "joint default", *dict.fromkeys([chosen, *top])]

    print(f"\nweights {args.weights}; val {args.val_scans} and test {args.test_scans} scans x {args.frames} frames; "
          f"{os.cpu_count()} CPU cores ({platform.machine()})\n")
    short = {"fp_area_per_empty_frame": "fp_px/empty"}
    header = f"{'set':5s} {'model':64s}" + "".join(f"{short.get(c, c):>12s}" for c in METRICS) + "  >= every single"
    print(header)
    print("-" * len(header))
    for set_name, rows in table.items():
        for model in shown:
            row = rows[model]
            mark = ("yes" if acceptable(set_name, model) else "no") if model.startswith("joint") else ""
            star = " *" if model == chosen else ""
            print(f"{set_name:5s} {model + star:64s}" + "".join(f"{row[c]:12.3f}" for c in METRICS) + f"  {mark}")
    print(f"\n{len(rules)} rules tried on validation; shown: the single models, the default rule and the {args.show} "
          f"best on validation (mean IoU + F1 + AP).\n* chosen on validation: {chosen}"
          + (" (NOT acceptable: no rule matched every single model on validation; best by the sum)" if fallback else ""))
    if args.all_rules:
        from dipid.files import atomic_write_text
        from dipid.tables import text_table

        singles = [r for r in table["val"] if not r.startswith("joint")]
        rows = [[name, *(f"{table['val'][name][c]:.3f}" for c in METRICS)] for name in [*singles, *joint_rows]]
        atomic_write_text(args.all_rules, text_table(["rule (validation)", *METRICS], rows) + "\n")
        print(f"wrote every rule's validation row to {args.all_rules}")
    if args.write_settings and chosen:
        from dipid.errors import DipidError
        from dipid.files import atomic_write_text
        from dipid.models.weights import SETTINGS_FILE
        from dipid.predict import read_settings

        rule = asdict(rules[chosen.removeprefix("joint ")])
        tuned = {name: value for name, value in rule.items() if name.startswith("fusion_") or name == "threshold"}
        settings_path = Path(args.weights) / SETTINGS_FILE
        # the speed settings already there (proposals, classical_gate, peak_windows) stay, while the new rule allows them
        kept = {k: v for k, v in (read_settings(settings_path) if settings_path.is_file() else {}).items() if k not in tuned}
        try:
            PredictorSettings(**{**kept, **tuned})
        except DipidError as exc:
            dropped = {k: kept.pop(k) for k in ("classical_gate", "peak_windows") if k in kept}
            print(f"the chosen rule does not allow {dropped} ({exc}); not kept")
        path = atomic_write_text(settings_path, json.dumps({**tuned, **kept}, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
