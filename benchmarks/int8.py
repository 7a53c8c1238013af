"""int8 beside fp32: the benchmark networks' bundles side by side in one run (ONNX Runtime, CPU).

    .venv/bin/python benchmarks/int8.py                       # both networks
    .venv/bin/python benchmarks/int8.py resnet56 --min-seconds 5 --skip-build

Per network (committed gated models, benchmarks/weights/NETWORK_gated.pt):
1. `dgate-export build` of the fp32 bundle (engines/bench-NETWORK, as run.py) and of the int8 bundle
   (engines/bench-NETWORK-int8: --precision int8 --calibration-data fashion-mnist, 512 training rows;
   thresholds refitted on the int8 graphs with the setting the fp32 thresholds were chosen with,
   results/NETWORK_calibration.json: max_drop 0.01 held by the drop's upper bound at the recorded
   level, on the calibration half of validation = --holdout 0.5);
2. accuracy on the whole test split: un-gated and gated, fp32 and int8; exits; FLOPs saved;
3. latency at batch 1 and 256, four runs interleaved on the same batches in rotating order: un-gated
   fp32, gated fp32, gated int8, un-gated int8;
4. where the time goes: every segment graph alone on the same rows, fp32 and int8 interleaved, and
   the time of leaving at each exit.
Writes benchmarks/results/int8.json and prints the table (benchmarks/README.md, "int8").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dgate_export.bench import latency_stats, quality
from dgate_export.data import load_dataset
from dgate_export.runtime import GatedRuntime

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CLI = [str(Path(sys.executable).parent / "dgate-export")]
NETWORKS = ("resnet56", "densenet_bc")
BATCH_SIZES = (1, 256)
CONFIGS = ("ungated_fp32", "gated_fp32", "gated_int8", "ungated_int8")


def build_commands(network: str) -> dict[str, list[str]]:
    setting = json.loads((BENCH / "results" / f"{network}_calibration.json").read_text())
    model = f"benchmarks/weights/{network}_gated.pt"
    return {
        "fp32": ["dgate-export", "build", model, "-o", f"engines/bench-{network}", "--force"],
        "int8": ["dgate-export", "build", model, "-o", f"engines/bench-{network}-int8", "--force", "--precision",
                 "int8", "--calibration-data", "fashion-mnist", "--calibration-rows", "512",
                 "--max-drop", str(setting["target"]), "--guarantee", "none",
                 "--upper-bound", str(setting["upper_bound"]),
                 "--holdout", "0.5"],
    }


def time_interleaved(runs: dict, batches: list[np.ndarray], *, min_seconds: float, warmup_s: float = 0.5) -> dict:
    """Each iteration runs every config once on the same batch; the order rotates every iteration."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}

    def one(i: int, record: bool) -> None:
        b = batches[i % len(batches)]
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            runs[name](b)
            if record:
                times[name].append(time.perf_counter() - t0)

    start, i = time.perf_counter(), 0
    while time.perf_counter() - start < warmup_s or i < 2:
        one(i, False)
        i += 1
    start = time.perf_counter()
    while len(times[names[0]]) < 10 or time.perf_counter() - start < min_seconds:
        one(i, True)
        i += 1
    return {n: latency_stats(t) for n, t in times.items()}


def segment_times(fp32: GatedRuntime, int8: GatedRuntime, x: np.ndarray, *, min_seconds: float) -> list[dict]:
    """Every segment graph alone on all rows of x (nobody leaves), fp32 and int8 interleaved."""
    from dgate_export.compile.quantize import every_exit, segment_feeds

    feeds = segment_feeds(every_exit([r._session for r in fp32._runners], x), x)
    rows: list[dict] = []
    for k, feed in enumerate(feeds):
        runs = {"fp32": lambda _b, r=fp32._runners[k], f=feed: r.run(f),
                "int8": lambda _b, r=int8._runners[k], f=feed: r.run(f)}
        t = time_interleaved(runs, [x], min_seconds=min_seconds / 2, warmup_s=0.2)
        rows.append({"segment": k, "fp32_ms": t["fp32"]["median"], "int8_ms": t["int8"]["median"],
                     "speedup": t["fp32"]["median"] / t["int8"]["median"]})
    return rows


def run_network(network: str, args) -> dict:
    print(f"== {network}", flush=True)
    commands = build_commands(network)
    load = {"before_build": os.getloadavg()}
    for cmd in commands.values():
        exists = (ROOT / cmd[4] / "manifest.json").is_file()
        if not (args.skip_build or (args.keep_built and exists)):
            subprocess.run(CLI + cmd[1:], cwd=ROOT, check=True)
    test = load_dataset("fashion-mnist", "test")
    rts = {p: GatedRuntime.load(ROOT / commands[p][4]) for p in ("fp32", "int8")}
    bases = {p: rts[p].baseline_runner() for p in rts}
    manifest = rts["fp32"].manifest
    costs = rts["fp32"].manifest.exit_costs()
    baseline_flops = float(manifest.baseline.flops)
    acc = {p: quality(rts[p], bases[p], test.x, test.y, costs, baseline_flops) for p in rts}
    for p, q in acc.items():
        print(f"{p}: un-gated {q['accuracy']['baseline']:.4f} gated {q['accuracy']['gated']:.4f} "
              f"FLOPs saved {q['flops']['reduction']:.1%} exits {np.round(q['exits']['fractions'], 3).tolist()}",
              flush=True)
    runs = {
        "ungated_fp32": lambda b: bases["fp32"].run({"input": b}),
        "gated_fp32": lambda b: rts["fp32"].run(b),
        "gated_int8": lambda b: rts["int8"].run(b),
        "ungated_int8": lambda b: bases["int8"].run({"input": b}),
    }
    load["before_timing"] = os.getloadavg()
    speed = {}
    for bs in BATCH_SIZES:
        n = max(1, len(test.x) // bs)
        batches = [test.x[i * bs:(i + 1) * bs] for i in range(min(n, 64))]
        t = time_interleaved(runs, batches, min_seconds=args.min_seconds)
        mean = {c: t[c]["mean"] for c in CONFIGS}
        speed[str(bs)] = {"latency_ms": t,
                          "gated_int8_vs_ungated_fp32": mean["ungated_fp32"] / mean["gated_int8"],
                          "gated_int8_vs_gated_fp32": mean["gated_fp32"] / mean["gated_int8"],
                          "gated_fp32_vs_ungated_fp32": mean["ungated_fp32"] / mean["gated_fp32"],
                          "ungated_int8_vs_ungated_fp32": mean["ungated_fp32"] / mean["ungated_int8"],
                          "load_average": os.getloadavg()}
        s = speed[str(bs)]
        print(f"batch {bs}: ms " + ", ".join(f"{c} {mean[c]:.3g}" for c in CONFIGS)
              + f"; gated int8 vs un-gated fp32 {s['gated_int8_vs_ungated_fp32']:.2f}x, vs gated fp32 "
              f"{s['gated_int8_vs_gated_fp32']:.2f}x; load {s['load_average'][0]:.1f}", flush=True)
    where = {str(bs): segment_times(rts["fp32"], rts["int8"], test.x[:bs], min_seconds=args.min_seconds)
             for bs in BATCH_SIZES}
    for bs, rows in where.items():
        print(f"batch {bs} per segment (fp32 -> int8 ms): "
              + "; ".join(f"{r['segment']}: {r['fp32_ms']:.3g} -> {r['int8_ms']:.3g} ({r['speedup']:.2f}x)"
                          for r in rows), flush=True)
    load["after"] = os.getloadavg()
    return {
        "network": network,
        "accuracy": {p: acc[p]["accuracy"] for p in acc},
        "exits": {p: acc[p]["exits"] for p in acc},
        "flops": {p: acc[p]["flops"] for p in acc},
        "thresholds": {p: list(rts[p].thresholds) for p in rts},
        "quantization": rts["int8"].manifest.quantization,
        "speed": speed,
        "segments": where,
        "load_average": load,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "commands": {p: " ".join(c) for p, c in commands.items()}
        | {"this": f"python benchmarks/int8.py {network} --min-seconds {args.min_seconds}"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("networks", nargs="*", default=list(NETWORKS))
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--skip-build", action="store_true", help="use the bundles already in engines/")
    parser.add_argument("--keep-built", action="store_true", help="build only the bundles missing in engines/")
    parser.add_argument("--json", default=str(BENCH / "results" / "int8.json"))
    args = parser.parse_args()
    rows = [run_network(n, args) for n in args.networks]
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
