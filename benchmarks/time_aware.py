"""FLOPs-optimal vs time-aware thresholds, measured side by side on one bundle (ONNX Runtime CPU).

    python benchmarks/time_aware.py --bundle engines/resnet56 --model benchmarks/weights/resnet56_gated.pt \
        --profile profile.json --batch-sizes 1,256

Both sets are chosen with calibrate's defaults (max_drop 0.01, Learn then Test, delta 0.1) on the model's
validation split: one minimizing FLOPs, one minimizing the profile's measured time at each batch size.
Then, per batch size, the baseline and the gated runtime with each set run interleaved call by call (the
order rotating every round) on consecutive test batches; the mean latencies give the speed-ups. The
load average before and after is recorded: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from dgate_export.calibrate import Target, calibrate, evaluate
from dgate_export.compile import checkpoint
from dgate_export.compile.train import collect_exit_logits
from dgate_export.data import load_dataset
from dgate_export.profile import load_costs
from dgate_export.runtime import GatedRuntime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per batch size")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model = checkpoint.load(args.model)
    split = model.data_split or {}
    val = load_dataset("fashion-mnist", "val", val_size=split.get("val_size", 5000), seed=split.get("seed", 0))
    test = load_dataset("fashion-mnist", "test")
    val_logits, val_y = collect_exit_logits(model, val, progress=False)
    test_logits, test_y = collect_exit_logits(model, test, progress=False)
    flops, base = model.exit_costs(), float(model.flops["baseline"])
    kw = {"confidence": model.confidence}
    sets = {"flops": calibrate(val_logits, val_y, costs=flops, baseline_flops=base, **kw,
                               target=Target(max_drop=0.01)).thresholds}
    report: dict = {"command": "python benchmarks/time_aware.py " + " ".join(argv or sys.argv[1:]), "batches": []}
    rt = GatedRuntime.load(args.bundle)
    baseline = rt.baseline_runner()
    rt.warmup()
    for b in [int(v) for v in args.batch_sizes.split(",")]:
        time_costs, _ = load_costs(args.profile, batch_size=b, model_structure={
            "exits": list(model.exits), "segment_flops": [int(f) for f in model.flops["segments"]],
            "head_flops": [int(f) for f in model.flops["heads"]]})
        sets[f"time{b}"] = calibrate(val_logits, val_y, costs=time_costs, baseline_flops=1.0, **kw,
                                     target=Target(max_drop=0.01)).thresholds
        runs = {"baseline": None, "flops": sets["flops"], "time": sets[f"time{b}"]}
        batches = [test.x[i:i + b] for i in range(0, len(test.x) - b + 1, b)]
        times: dict[str, list[float]] = {k: [] for k in runs}
        load_before = os.getloadavg()
        start, i = time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds or i < 6:
            names = list(runs)
            names = names[i % 3:] + names[:i % 3]
            x = batches[i % len(batches)]
            for name in names:
                t0 = time.perf_counter()
                if runs[name] is None:
                    baseline.run({"input": x})
                else:
                    rt.run(x, thresholds=runs[name])
                if i >= 3:  # the first rounds warm up
                    times[name].append(time.perf_counter() - t0)
            i += 1
        mean = {k: float(np.mean(v)) for k, v in times.items()}
        entry = {"batch_size": b, "rounds": len(times["baseline"]), "load_average": [*load_before, *os.getloadavg()],
                 "mean_ms": {k: 1e3 * v for k, v in mean.items()},
                 "speedup": {k: mean["baseline"] / mean[k] for k in ("flops", "time")},
                 "thresholds": {"flops": sets["flops"], "time": sets[f"time{b}"]}}
        entry["time_over_flops"] = entry["speedup"]["time"] / entry["speedup"]["flops"]
        for name in ("flops", "time"):
            ev = evaluate(test_logits, test_y, thresholds=runs[name], costs=flops, baseline_flops=base, **kw)
            entry[f"test_{name}"] = {"drop": ev.accuracy_drop, "flops_reduction": ev.flops_reduction,
                                     "exit_fractions": ev.exit_fractions}
        print(json.dumps(entry), flush=True)
        report["batches"].append(entry)
    rt.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
