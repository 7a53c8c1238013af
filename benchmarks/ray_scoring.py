"""Offline scoring throughput: the in-process runtime vs Ray Data with 1 and 2 actors, gated and un-gated.

    .venv/bin/python cli.py build benchmarks/weights/resnet56_gated.pt -o engines/resnet56
    .venv/bin/python benchmarks/ray_scoring.py --bundle engines/resnet56 --rounds 2

Every figure is `dgate_export.score.score` (what `dgate-export score` runs) on the 10 000 images of
Fashion-MNIST's test split, batch 256, writing the parquet file: in-process (one GatedRuntime, one ONNX
Runtime thread per session), and on one local Ray instance (2 CPUs; started once, its start-up timed
apart) with a pool of 1 and 2 actors (1 CPU and 1 ONNX Runtime thread each). "Gated" runs the bundle's
thresholds; "un-gated" disables every gate (thresholds above 1: each row runs every segment and gate
head, a little more than the bundle's baseline.onnx, which is timed in-process for reference).

A Ray job's time includes starting its actor pool (each loads the bundle) and moving the rows through
Ray's object store; the fixed part of it is measured by a job on 256 rows. Modes are run interleaved,
in `--rounds` rounds (the order alternating), and each figure is the fastest of its rounds, since
other processes on a shared machine only ever add time. Every job's predictions and exits are checked
against the in-process ones. The load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dgate_export.data import load_dataset
from dgate_export.runtime import GatedRuntime
from dgate_export.score import score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="engines/resnet56")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", default="benchmarks/results/ray_scoring.json")
    parser.add_argument("--add", action="store_true", help="Add this run's rounds to those already in --json.")
    args = parser.parse_args()

    import ray

    data = load_dataset("fashion-mnist", "test")
    x, y = data.x, data.y
    runtime = GatedRuntime.load(args.bundle)
    off = [2.0] * runtime.num_gates
    want = {"gated": runtime.run(x), "un-gated": runtime.run(x, thresholds=off)}
    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray_startup = time.perf_counter() - started
    tmp = Path(tempfile.mkdtemp())

    def job(where: str, actors: int | None, plan: str, n: int = len(x)) -> float:
        out = tmp / "p.parquet"
        summary = score(args.bundle, x[:n], y[:n], out, ray=where, actors=actors, batch_size=args.batch_size,
                        thresholds=None if plan == "gated" else off, force=True, progress=False)
        import pyarrow.parquet as pq

        table = pq.read_table(out, columns=["prediction", "exit"])
        ok = (np.array_equal(table["prediction"].to_numpy(), want[plan].predictions[:n])
              and np.array_equal(table["exit"].to_numpy(), want[plan].exits[:n]))
        if not ok:
            raise SystemExit(f"{where} {actors} {plan}: predictions differ from the in-process runtime")
        return summary.seconds

    def baseline() -> float:
        base = runtime.baseline_runner()
        t = time.perf_counter()
        for s in range(0, len(x), args.batch_size):
            base.run({"input": x[s:s + args.batch_size]})
        return time.perf_counter() - t

    modes = [("in-process", None, None), ("ray", "local", 1), ("ray", "local", 2)]
    times: dict[str, list[float]] = {}
    if args.add:
        previous = json.loads(Path(args.json).read_text())
        times, loads = previous["times_s"], previous["load_average"] + loads
        ray_startups = previous.get("ray_startup_s_all", [previous["ray_startup_s"]])
    else:
        ray_startups = []
    ray_startups.append(ray_startup)
    first = len(times.get("in-process gated", []))
    for r in range(first, first + args.rounds):
        order = [(m, p) for m in modes for p in ("gated", "un-gated")]
        order = order if r % 2 == 0 else order[::-1]
        for (name, where, actors), plan in order:
            key = f"{name} {actors or ''} {plan}".replace("  ", " ")
            times.setdefault(key, []).append(job(where, actors, plan) if where else job(None, None, plan))
            print(f"round {r}: {key}: {times[key][-1]:.2f} s", flush=True)
            loads.append(os.getloadavg()[0])
        times.setdefault("baseline.onnx in-process", []).append(baseline())
        times.setdefault("ray 1 fixed (256 rows, gated)", []).append(job("local", 1, "gated", n=256))
        times.setdefault("ray 2 fixed (256 rows, gated)", []).append(job("local", 2, "gated", n=256))
        loads.append(os.getloadavg()[0])
    ray.shutdown()

    best = {k: min(v) for k, v in times.items()}
    rows = len(x)
    print(f"\nFashion-MNIST test split ({rows} rows), batch {args.batch_size}, {args.bundle}; fastest of "
          f"{len(times['in-process gated'])} rounds; Ray start-up {min(ray_startups):.1f}-{max(ray_startups):.1f} s; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    print("| mode | gated s | gated samples/s | un-gated s | un-gated samples/s | gated speed-up |")
    print("|---|---|---|---|---|---|")
    for name, _, actors in modes:
        key = f"{name} {actors or ''}".strip()
        g, u = best[f"{key} gated"], best[f"{key} un-gated"]
        print(f"| {key} | {g:.2f} | {rows / g:.0f} | {u:.2f} | {rows / u:.0f} | {u / g:.2f}x |")
    print(f"baseline.onnx in-process: {best['baseline.onnx in-process']:.2f} s "
          f"({rows / best['baseline.onnx in-process']:.0f} samples/s)")
    for a in (1, 2):
        print(f"ray {a} actor(s), 256-row job: {best[f'ray {a} fixed (256 rows, gated)']:.2f} s")
    record = {"bundle": args.bundle, "rows": rows, "batch_size": args.batch_size,
              "rounds": len(times["in-process gated"]), "ray_startup_s": min(ray_startups),
              "ray_startup_s_all": ray_startups, "load_average": [min(loads), max(loads)], "times_s": times,
              "best_s": best, "cpus": os.cpu_count(), "ray": ray.__version__}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
