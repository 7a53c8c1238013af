"""Choose the calibration setting by cross-validation on the VALIDATION split, then calibrate.

    .venv/bin/python benchmarks/calibrate_margin.py resnet56
    .venv/bin/python benchmarks/calibrate_margin.py densenet_bc

Why: thresholds fitted to exactly max_drop = 0.01 on 5000 validation samples give a larger drop on new
data, because the search picks the cheapest thresholds that pass on *these* samples (winner's curse).
Measured by 2-fold cross-validation inside the validation split (calibrate on one half, evaluate on the
other), the held-out drop at max_drop 0.01 averaged about 1.5 points for both benchmark networks. So the
calibration target (max_drop) and the refinement step are chosen here as hyper-parameters: for every
(max_drop, refine) in GRID, 5 seeded random halvings × 2 folds; among the settings whose mean held-out
drop is <= TARGET_DROP, the one with the largest mean held-out FLOPs reduction wins. The thresholds
are then calibrated on the whole validation split with that setting and written into
benchmarks/weights/NETWORK_gated.pt; benchmarks/results/NETWORK_calibration.json records the setting
and the cross-validation table. The test split is never read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dgate_export import checkpoint
from dgate_export.calibrate import calibrate, evaluate
from dgate_export.data import load_dataset
from dgate_export.train import collect_exit_logits

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TARGET_DROP = 0.01
GRID = [(m, r) for m in (0.01, 0.0075, 0.005, 0.0025, 0.0) for r in (True, False)]
SEEDS = range(5)


def cross_validate(logits, labels, *, confidence: str, costs, baseline: float, max_drop: float,
                   refine: bool) -> dict:
    drops, reductions = [], []
    n = len(labels)
    for seed in SEEDS:
        perm = np.random.default_rng(seed).permutation(n)
        halves = (perm[: n // 2], perm[n // 2:])
        for fit, held in (halves, halves[::-1]):
            cal = calibrate([lg[fit] for lg in logits], labels[fit], confidence=confidence, costs=costs,
                            baseline_flops=baseline, max_drop=max_drop, refine=refine)
            e = evaluate([lg[held] for lg in logits], labels[held], confidence=confidence,
                         thresholds=cal.thresholds, costs=costs, baseline_flops=baseline)
            drops.append(e.accuracy_drop)
            reductions.append(e.flops_reduction)
    return {"max_drop": max_drop, "refine": refine, "held_out_drop_mean": float(np.mean(drops)),
            "held_out_drop_max": float(np.max(drops)), "held_out_flops_reduction_mean": float(np.mean(reductions))}


def choose(logits, labels, *, confidence: str, costs, baseline: float) -> tuple[dict, list[dict]]:
    table = [cross_validate(logits, labels, confidence=confidence, costs=costs, baseline=baseline,
                            max_drop=m, refine=r) for m, r in GRID]
    ok = [row for row in table if row["held_out_drop_mean"] <= TARGET_DROP + 1e-12]
    if not ok:  # max_drop 0 always passes in practice; if not, take the smallest drop
        return min(table, key=lambda row: row["held_out_drop_mean"]), table
    return max(ok, key=lambda row: row["held_out_flops_reduction_mean"]), table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("network")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    path = BENCH / "weights" / f"{args.network}_gated.pt"
    model = checkpoint.load(path)
    val = load_dataset("fashion-mnist", "val")
    logits, labels = collect_exit_logits(model, val, progress=False)
    costs, baseline = model.exit_costs(), float(model.flops["baseline"])
    best, table = choose(logits, labels, confidence=model.confidence, costs=costs, baseline=baseline)
    for row in table:
        print(f"max_drop {row['max_drop']:<6g} refine {row['refine']!s:<5}: held-out drop "
              f"{100 * row['held_out_drop_mean']:.2f} pts (max {100 * row['held_out_drop_max']:.2f}), "
              f"FLOPs -{row['held_out_flops_reduction_mean']:.1%}", flush=True)
    cal = calibrate(logits, labels, confidence=model.confidence, costs=costs, baseline_flops=baseline,
                    max_drop=best["max_drop"], refine=best["refine"])
    model.thresholds = list(cal.thresholds)
    checkpoint.save(model, path)
    out = cal.to_dict()
    out.update(refine=best["refine"], target_drop=TARGET_DROP, cross_validation=table,
               command=f"python benchmarks/calibrate_margin.py {args.network}")
    (BENCH / "results" / f"{args.network}_calibration.json").write_text(json.dumps(out, indent=1) + "\n")
    v = cal.validation
    print(f"{args.network}: chose max_drop {best['max_drop']} refine {best['refine']}; thresholds "
          f"{[round(t, 4) for t in cal.thresholds]}; validation accuracy {v.accuracy:.4f} (un-gated "
          f"{v.accuracy_ungated:.4f}), FLOPs -{v.flops_reduction:.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
