"""The benchmark networks under calibrate's default promise (Learn then Test, max_drop 0.01, delta 0.1).

    python benchmarks/promise.py resnet56 densenet_bc   # -> benchmarks/results/promise.json

For each committed gated model: exit logits on its validation split (10 000 rows) and on the test split,
then thresholds three ways on validation: calibrate's defaults on every validation row (what
`dgate-export calibrate MODEL --data fashion-mnist` does), the same with the design-search half held out
(`holdout=0.5`, as gate_networks.py now does), and `--guarantee none` (the drop held on validation only).
Each set is evaluated once on test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dgate_export.calibrate import Target, calibrate, evaluate
from dgate_export.compile import checkpoint
from dgate_export.compile.train import collect_exit_logits
from dgate_export.data import load_dataset

BENCH = Path(__file__).resolve().parent
SETTINGS = {"default": {}, "search half held out": {"holdout": 0.5}, "guarantee none": {"guarantee": "none"}}


def main(networks: list[str]) -> int:
    out = {}
    for net in networks:
        model = checkpoint.load(BENCH / "weights" / f"{net}_gated.pt")
        split = model.data_split or {}
        val = load_dataset("fashion-mnist", "val", val_size=split.get("val_size", 5000), seed=split.get("seed", 0))
        test = load_dataset("fashion-mnist", "test")
        vl, vy = collect_exit_logits(model, val, progress=False)
        tl, ty = collect_exit_logits(model, test, progress=False)
        kw = {"confidence": model.confidence, "costs": model.exit_costs(), "baseline_flops": float(model.flops["baseline"])}
        out[net] = {}
        for name, extra in SETTINGS.items():
            r = calibrate(vl, vy, **kw, **extra, target=Target(max_drop=0.01))
            t = evaluate(tl, ty, thresholds=r.thresholds, **kw)
            out[net][name] = {"thresholds": r.thresholds, "promise": r.promise(), "method": r.method,
                              "validation": r.validation.to_dict(), "test": t.to_dict(),
                              "guarantee": r.to_dict()["guarantee"]}
            print(f"{net} {name}: test drop {t.accuracy_drop:.4f}, FLOPs saved {t.flops_reduction:.1%}", flush=True)
    (BENCH / "results" / "promise.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["resnet56", "densenet_bc"]))
