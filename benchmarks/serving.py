"""Serving under load: the ResNet-56 bundle on a local Triton server, three ways on the same server.

    .venv/bin/python cli.py build benchmarks/weights/resnet56_gated.pt -o engines/resnet56
    .venv/bin/python benchmarks/serving.py --bundle engines/resnet56          # ~5 minutes
    .venv/bin/python benchmarks/serving.py --bundle engines/resnet56 --stress 10000 --no-load

(a) `baseline`: the un-gated model with dynamic batching; (b) `gated`: the gate model (BLS) over the
segment models with dynamic batching, so the survivors of concurrent requests are merged at every
segment; (c) `unbatched`: the same gate model over copies of the segments without dynamic batching
(one request per execution); (d) `gate-batched`: (b) with `--gate-batching`, the gate model batching
requests too, so that one chain of segment calls serves several requests (its first statistics entry
is the gate model's own mean batch, in requests' rows). Closed loops at 1, 4, 16, 64 concurrent clients with requests of 1 and
16 rows, and open loops at fixed request rates (fractions of the baseline's closed-loop rate at
concurrency 16, size 1); the three models take turns point by point (side by side, same minute).
For each point: throughput (samples/s), latency p50/p90/p99 (ms), each model's mean executed batch
size from Triton's statistics (rows / executions: above the request size, requests were merged), and
samples per server CPU-second (CPU time of tritonserver and its Python backend processes, read from
/proc): on a shared machine a configuration with more busy processes gets a larger share of the cores,
which inflates its wall-clock throughput but not its throughput per CPU-second.

Ideal speed-up = baseline FLOPs / expected FLOPs of the gated chain on the request rows (Fashion-MNIST
test images, the bundle's thresholds), from the manifest's per-segment FLOPs (as `bench` computes it).
The goal checked: at concurrency 16 and 64, gated throughput >= 0.8 x ideal x baseline throughput, with
p99 latency no worse than the baseline's.

--stress N: N requests of 1..32 random rows with random thresholds from 16 concurrent clients over
gRPC; every response must arrive once and equal GatedRuntime.run on the same rows (exits identical,
logits within 1e-4).

Everything runs on 127.0.0.1 (server, clients, this script): clients and server share the cores.
Results: benchmarks/results/serving.json and benchmarks/plots/serving.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dgate_export.bench import latency_stats
from dgate_export.contract import expected_cost
from dgate_export.data import load_dataset
from dgate_export.runtime import GatedRuntime
from dgate_export.serving import TritonServer, find_server, write_repository

LOAD = Path(__file__).resolve().parent / "serving_load.py"
CLIENT = ROOT / "tests" / "triton_client.py"
MODES = ("baseline", "gated", "unbatched", "gate-batched")


def _load() -> str:
    """The 1, 5 and 15-minute load averages (the machine is shared: they say how much)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _model_names(name: str, segments: int) -> dict[str, tuple[str, list[str]]]:
    """mode -> (model to request, models whose statistics are read)."""
    segs = [f"{name}_seg{k}" for k in range(segments)]
    plain = [f"{name}_unbatched_seg{k}" for k in range(segments)]
    batched = [f"{name}_gb", *[f"{name}_gb_seg{k}" for k in range(segments)]]
    return {"baseline": (f"{name}_baseline", [f"{name}_baseline"]), "gated": (name, segs),
            "unbatched": (f"{name}_unbatched", plain), "gate-batched": (f"{name}_gb", batched)}


def _run_load(python: str, server: TritonServer, x: np.ndarray, items: list[dict], work: Path,
              warmup: float) -> list[dict]:
    np.savez(work / "pool.npz", x=x)
    job = {"url": server.grpc_url, "inputs": str(work / "pool.npz"), "warmup_seconds": warmup, "items": items,
           "server_pid": server.process.pid if server.process else None}
    (work / "load.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([python, str(LOAD), str(work / "load.json")], stdout=subprocess.PIPE, env=env, check=False,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"the load generator failed (status {proc.returncode}); server log:\n{server.log_tail()}")
    return list(json.loads(proc.stdout))


def _summary(r: dict) -> dict:
    lat = latency_stats(r["latencies"]) if r["latencies"] else {}
    batches = {m: (rows / ex if ex else None) for m, (rows, ex) in r["stats"].items()}
    out = {k: r[k] for k in ("model", "loop", "size", "seconds") if k in r}
    out.update({k: r[k] for k in ("concurrency", "rate", "sent", "unanswered") if k in r})
    out.update({"requests": len(r["latencies"]), "errors": len(r["errors"]),
                "throughput": r["rows"] / r["elapsed"], "latency_ms": lat, "mean_batch": batches,
                "server_cpu_seconds": r["server_cpu_seconds"],
                "samples_per_cpu_second": r["rows"] / r["server_cpu_seconds"] if r["server_cpu_seconds"] else None})
    return out


def stress(python: str, server: TritonServer, rt: GatedRuntime, x: np.ndarray, n: int, work: Path,
           name: str) -> dict:
    rng = np.random.default_rng(7)
    requests, arrays, wants = [], {}, []
    for i in range(n):
        size = int(rng.integers(1, 33))
        start = int(rng.integers(0, len(x) - size + 1))
        rows = x[start:start + size]
        thr = np.sort(rng.uniform(0.5, 1.0, rt.num_gates)).round(4).tolist()
        arrays[f"r{i}"] = rows
        requests.append({"key": f"r{i}", "datatype": "FP32", "thresholds": ",".join(map(str, thr))})
        wants.append(rt.run(rows, thr))
    np.savez(work / "stress_in.npz", **arrays)
    job = {"url": server.grpc_url, "protocol": "grpc", "model": name, "concurrency": 16,
           "inputs": str(work / "stress_in.npz"), "out": str(work / "stress_out.npz"), "requests": requests}
    (work / "stress.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([python, str(CLIENT), str(work / "stress.json")], capture_output=True, text=True, check=False,
                          env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    data = np.load(work / "stress_out.npz")
    answered = {int(k.split("/")[0]) for k in data.files}
    exits_equal = logits_ok = 0
    worst = 0.0
    for i, want in enumerate(wants):
        if i not in answered:
            continue
        ex, lg = data[f"{i}/exits"], data[f"{i}/logits"]
        exits_equal += int(ex.shape == want.exits.shape and bool((ex == want.exits).all()))
        diff = float(np.abs(lg - want.logits).max()) if lg.shape == want.logits.shape else float("inf")
        worst = max(worst, diff)
        logits_ok += int(diff <= 1e-4)
    return {"requests": n, "answered": len(answered), "errors": len(report["errors"]), "exits_equal": exits_equal,
            "logits_within_1e-4": logits_ok, "max_abs_logit_diff": worst, "seconds": report["seconds"],
            "rows": int(sum(len(a) for a in arrays.values()))}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(11, 8))
    for row, (key, label) in enumerate((("throughput", "throughput (samples/s, wall clock)"),
                                        ("samples_per_cpu_second", "samples per server CPU-second"))):
        for ax, size in zip(grid[row], (1, 16)):
            for mode, color in zip(MODES, ("tab:gray", "tab:blue", "tab:orange", "tab:green")):
                pts = [r for r in results if r["mode"] == mode and r["loop"] == "closed" and r["size"] == size]
                ax.plot([p["latency_ms"]["p99"] for p in pts], [p[key] for p in pts], "o-", color=color, label=mode)
                for p in pts:
                    ax.annotate(str(p["concurrency"]), (p["latency_ms"]["p99"], p[key]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("p99 latency (ms, log)")
            ax.set_ylabel(label)
            ax.set_title(f"closed loop, {size} row(s) per request (labels: concurrency)", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "engines" / "resnet56"))
    ap.add_argument("--seconds", type=float, default=3.0, help="per load point")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--sizes", default="1,16")
    ap.add_argument("--rate-fractions", default="0.5,1,2",
                    help="open-loop request rates as fractions of the baseline's closed-loop rate (c16, size 1)")
    ap.add_argument("--instances", type=int, default=16, help="gate model instances")
    ap.add_argument("--gb-instances", type=int, default=4, help="gate model instances of the gate-batched chain")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per segment/baseline instance")
    ap.add_argument("--segment-instances", type=int, default=2)
    ap.add_argument("--max-queue-delay-us", type=int, default=0)
    ap.add_argument("--pool", type=int, default=2000, help="Fashion-MNIST test rows the requests draw from")
    ap.add_argument("--stress", type=int, default=0, help="also run N random requests and check every answer")
    ap.add_argument("--no-load", action="store_true", help="skip the load points (with --stress)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "plots" / "serving.png"))
    args = ap.parse_args()

    install = find_server()
    python = str(install.python or sys.executable)
    rt = GatedRuntime.load(args.bundle)
    x = load_dataset("fashion-mnist", "test").x[: args.pool]
    res = rt.run(x)
    fractions = res.exit_counts / res.exit_counts.sum()
    baseline_flops = float(rt.manifest.baseline.flops or 0)
    ideal = baseline_flops / expected_cost(rt.manifest.exit_costs(), fractions)
    print(f"exit fractions {np.round(fractions, 3).tolist()}, ideal speed-up {ideal:.2f}x", flush=True)

    report: dict = {"bundle": str(args.bundle), "ideal_speedup": ideal, "exit_fractions": fractions.tolist(),
                    "thresholds": list(rt.thresholds), "settings": vars(args), "load_before": _load(),
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "note": "server, clients and this script share a 2-core machine that other jobs also used"}
    with tempfile.TemporaryDirectory(prefix="dgate-serving-bench-") as tmp:
        work = Path(tmp)
        info = write_repository(args.bundle, work / "repo", platform="python", instances=args.instances,
                                segment_instances=args.segment_instances, threads=args.threads,
                                max_queue_delay_us=args.max_queue_delay_us, unbatched=True)
        # (d) the gated chain with --gate-batching, as models NAME_gb, NAME_gb_seg*, in the same server
        extra = write_repository(args.bundle, work / "repo_gb", platform="python", instances=args.gb_instances,
                                 segment_instances=args.segment_instances, threads=args.threads,
                                 max_queue_delay_us=args.max_queue_delay_us, gate_batching=True,
                                 name=f"{info.name}_gb")
        for model in extra.models:
            if not model.endswith("_baseline"):
                (extra.path / model).rename(info.path / model)
        names = _model_names(info.name, len(rt.manifest.segments))
        t0 = time.perf_counter()
        with TritonServer(info.path, install=install) as server:
            print(f"server ready in {time.perf_counter() - t0:.1f} s", flush=True)
            if args.stress:
                report["stress"] = s = stress(python, server, rt, x, args.stress, work, info.name)
                print(f"stress: {s}", flush=True)
            if not args.no_load:
                conc = [int(c) for c in args.concurrency.split(",")]
                sizes = [int(s) for s in args.sizes.split(",")]
                items = [{"mode": mode, "model": names[mode][0], "stats": names[mode][1], "loop": "closed",
                          "size": size, "concurrency": c, "seconds": args.seconds}
                         for size in sizes for c in conc for mode in MODES]
                results = [_summary(r) | {"mode": r["mode"]} for r in _run_load(python, server, x, items, work, 2.0)]
                base_rate = next(r["throughput"] for r in results if r["mode"] == "baseline" and r["size"] == 1
                                 and r.get("concurrency") == 16)
                rates = [round(base_rate * float(f), 1) for f in args.rate_fractions.split(",")]
                items = [{"mode": mode, "model": names[mode][0], "stats": names[mode][1], "loop": "open", "size": 1,
                          "rate": rate, "seconds": args.seconds} for rate in rates for mode in MODES]
                results += [_summary(r) | {"mode": r["mode"]} for r in _run_load(python, server, x, items, work, 0.5)]
                report["results"] = results
        report["load_after"] = _load()
    if "results" in report:
        report["goal"] = goal(report["results"], ideal)
        plot(report["results"], Path(args.plot))
        print_table(report["results"])
        print(json.dumps(report["goal"], indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"load average before {report['load_before']}, after {report['load_after']}; wrote {args.json}")


def goal(results: list[dict], ideal: float) -> list[dict]:
    out = []
    for r in results:
        if r["mode"] not in ("gated", "gate-batched") or r["loop"] != "closed" or r["concurrency"] not in (16, 64):
            continue
        base = next(b for b in results if b["mode"] == "baseline" and b["loop"] == "closed"
                    and b["size"] == r["size"] and b["concurrency"] == r["concurrency"])
        out.append({"mode": r["mode"], "size": r["size"], "concurrency": r["concurrency"],
                    "speedup": r["throughput"] / base["throughput"], "target_speedup": 0.8 * ideal,
                    "speedup_per_cpu_second": (r["samples_per_cpu_second"] / base["samples_per_cpu_second"]
                                               if r["samples_per_cpu_second"] and base["samples_per_cpu_second"]
                                               else None),
                    "throughput_met": r["throughput"] >= 0.8 * ideal * base["throughput"],
                    "p99_ms": r["latency_ms"]["p99"], "baseline_p99_ms": base["latency_ms"]["p99"],
                    "p99_met": r["latency_ms"]["p99"] <= base["latency_ms"]["p99"]})
    return out


def print_table(results: list[dict]) -> None:
    print("| mode | loop | size | conc. / rate | samples/s | samples per server CPU-s | p50 ms | p90 ms | p99 ms "
          "| mean executed batch per model |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        lat = r["latency_ms"]
        batches = ", ".join(f"{b:.1f}" if b else "-" for b in r["mean_batch"].values())
        load = r.get("concurrency", r.get("rate"))
        per_cpu = f"{r['samples_per_cpu_second']:.0f}" if r["samples_per_cpu_second"] else "-"
        print(f"| {r['mode']} | {r['loop']} | {r['size']} | {load} | {r['throughput']:.0f} | {per_cpu} | "
              f"{lat.get('median', float('nan')):.1f} | {lat.get('p90', float('nan')):.1f} | "
              f"{lat.get('p99', float('nan')):.1f} | {batches} |")


if __name__ == "__main__":
    main()
