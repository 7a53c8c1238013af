"""Does early exit pay in wall-clock time as much as it saves in FLOPs?  (ONNX Runtime, CPU)

    .venv/bin/python benchmarks/runtime_speedup.py                       # builds engines/bench-resnet20
    .venv/bin/python benchmarks/runtime_speedup.py --bundle engines/NAME --use-bundle-thresholds

On real Fashion-MNIST test images, with thresholds that send most samples out early (by default chosen
so that 60 %, 15 % and 10 % of the samples leave at gates 0, 1, 2 and 15 % run the full network; a
trained bundle's own thresholds with --use-bundle-thresholds), for batch 1 and batch 256:

- ideal speed-up    = baseline FLOPs / expected FLOPs of the gated run (the exits actually taken)
- measured speed-up = baseline time / gated time, the baseline being the bundle's baseline.onnx on the
  same backend with the same session options; the two are timed interleaved call by call (the order
  alternating), over the same samples, in several rounds; each batch counts with its fastest round,
  since other processes on a shared machine only ever add time (whole-round ratios are printed too)
- efficiency        = measured / ideal (the goal: >= 0.9)
- per-gate overhead = (time of a run where nothing exits - baseline time) / number of gates: the price
  of the scheduler, the extra session runs, the gathers and the gate heads.
- from exit times  = baseline time / sum_k (share leaving at exit k) x (time of a run where everyone
  leaves at exit k): what a scheduler without overhead could reach on this backbone, whose segments
  do not all run at the same speed per FLOP (few-channel early layers are slower per FLOP).

Wall-clock is the measure; the calling thread's CPU time is printed beside it as a cross-check that
other processes on a shared machine cannot inflate (ONNX Runtime runs on the calling thread with the
default one intra-op thread).

Thresholds are chosen for exit fractions, not accuracy: the claim measured here is about time versus
FLOPs, which does not depend on whether the gates are trained. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dgate_export import backends
from dgate_export.compile.build import BuildOptions
from dgate_export.contract import INPUT, LOGITS, expected_cost
from dgate_export.data import load_dataset
from dgate_export.files import write_text_atomic
from dgate_export.runtime import GatedRuntime

ROOT = Path(__file__).resolve().parent.parent


def build_default(arch: str, arch_kwargs: dict, out: Path) -> Path:
    """A gated `arch` with the zoo's default exits (untrained heads), built for ONNX Runtime."""
    from dgate_export.compile import checkpoint, zoo
    from dgate_export.compile.build import build_bundle
    from dgate_export.compile.model import GatedModel

    data = load_dataset("fashion-mnist", "test")
    kwargs = {"num_classes": 10, **arch_kwargs}
    model = GatedModel.attach(zoo.build_backbone(arch, kwargs), list(zoo.arch_info(arch).default_exits),
                              arch={"name": arch, "kwargs": kwargs}, num_classes=10, input_shape=(1, 28, 28),
                              class_names=data.class_names, normalization=data.normalization)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(model, Path(tmp) / f"bench-{arch}.pt")
        return build_bundle(path, out, BuildOptions(max_batch=256, force=True), progress=None)


def thresholds_for(rt: GatedRuntime, x: np.ndarray, fractions: list[float]) -> list[float]:
    """Thresholds under which about fractions[k] of x leave at gate k (chosen gate by gate)."""
    chosen: list[float] = []
    left = 1.0
    for k, f in enumerate(fractions):
        probe = chosen + [0.0] + [2.0] * (rt.num_gates - k - 1)  # everyone reaching gate k leaves there
        res = rt.run(x, thresholds=probe)
        conf = res.confidence[res.exits == k]
        share = min(f / left, 1.0) if left > 0 else 0.0
        chosen.append(float(np.quantile(conf, 1.0 - share)) if share > 0 else 2.0)
        left -= f
    return chosen


def timed(fn) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this thread) of fn(). With one ONNX Runtime thread all the
    work runs on the calling thread, so CPU time is the wall-clock time minus waits for the cores that
    other processes hold: the cross-check that survives a shared machine."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def measure(rt: GatedRuntime, baseline, batches: list[np.ndarray], variants: dict[str, list[float]],
            rounds: int) -> dict[str, np.ndarray]:
    """Seconds [round, batch, clock (wall, cpu)] for "baseline" and each thresholds variant, interleaved
    batch by batch (the order alternating)."""
    def run_base(b):
        return baseline.run({INPUT: b}, host={LOGITS})[LOGITS].argmax(axis=1)

    calls = {"baseline": run_base}
    for name, thr in variants.items():
        calls[name] = lambda b, thr=thr: rt.run(b, thresholds=thr)
    order = list(calls)
    for b in batches[:3]:  # warm-up: allocators, caches
        for name in order:
            calls[name](b)
    times = {name: np.zeros((rounds, len(batches), 2)) for name in order}
    for r in range(rounds):
        for i, b in enumerate(batches):
            for name in (order if (i + r) % 2 == 0 else order[::-1]):
                times[name][r, i] = timed(lambda: calls[name](b))  # noqa: B023
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="a bundle to measure (default: build engines/bench-ARCH)")
    ap.add_argument("--arch", default="resnet20", help="zoo architecture of the default bundle")
    ap.add_argument("--arch-kwargs", type=json.loads, default={}, help='e.g. \'{"width": 32}\'')
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.15, 0.1],
                    help="target share of samples leaving at each gate (the rest run the full network)")
    ap.add_argument("--use-bundle-thresholds", action="store_true", help="use the manifest's thresholds")
    ap.add_argument("--threads", type=int, default=None, help="intra_op_num_threads (default: the backend's)")
    ap.add_argument("--samples-b1", type=int, default=300, help="samples timed one by one")
    ap.add_argument("--batches", type=int, default=4, help="batches of 256 timed")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, help="JSON report (default: benchmarks/results/runtime_speedup-BUNDLE.json)")
    args = ap.parse_args(argv)

    bundle = args.bundle
    if bundle is None:
        suffix = "".join(f"-{k}{v}" for k, v in sorted(args.arch_kwargs.items()))
        bundle = ROOT / "engines" / f"bench-{args.arch}{suffix}"
        if not (bundle / "manifest.json").is_file():
            print(f"building {bundle} ...", flush=True)
            build_default(args.arch, args.arch_kwargs, bundle)
    options = {} if args.threads is None else {"intra_op_num_threads": args.threads}
    rt = GatedRuntime.load(bundle, **options)
    m = rt.manifest
    base_file = m.baseline.engine["file"]
    baseline = backends.get_backend(m.backend).Runner(m.path(base_file), {"max_batch": m.max_batch, **options})

    data = load_dataset("fashion-mnist", "test", channels=rt.input_shape[0])
    n_big = 256 * args.batches
    x = data.x[: max(n_big, args.samples_b1)]
    if args.use_bundle_thresholds:
        some = list(rt.thresholds)
    else:
        if len(args.fractions) != rt.num_gates:
            ap.error(f"--fractions needs {rt.num_gates} values for this bundle")
        some = thresholds_for(rt, x, args.fractions)
    none = [2.0] * rt.num_gates  # above 1: nobody leaves
    costs = rt.manifest.exit_costs()
    base_flops = float(m.baseline.flops or costs[-1])

    report: dict = {
        "command": shlex.join(["python", *sys.argv]),
        "bundle": os.path.relpath(bundle, ROOT), "arch": (m.source or {}).get("arch"), "backend": m.backend,
        "num_gates": rt.num_gates, "thresholds": some, "baseline_flops": base_flops,
        "exit_costs_flops": costs, "session_options": options or "backend defaults",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_at_start": list(os.getloadavg())},
        "batches": {},
    }
    K = rt.num_gates
    variants = {"gated": some, "nothing exits": none}
    for k in range(K):  # everyone leaves at gate k: what exit k costs, measured
        variants[f"all exit at {k}"] = [2.0] * k + [0.0] + [2.0] * (K - k - 1)
    for batch in (1, 256):
        if batch == 1:
            batches = [x[i:i + 1] for i in range(args.samples_b1)]
        else:
            batches = [x[i:i + 256] for i in range(0, n_big, 256)]
        times = measure(rt, baseline, batches, variants, args.rounds)
        counts = sum(rt.run(b, thresholds=some).exit_counts for b in batches)
        fractions = counts / counts.sum()
        expected = expected_cost(costs, fractions)
        ideal = base_flops / expected
        # Each batch's fastest round: other processes on a shared machine only ever add time.
        per_call = {k: v.min(axis=0).mean(axis=0) for k, v in times.items()}  # (wall, cpu) seconds
        exit_times = [per_call[f"all exit at {k}"] for k in range(K)] + [per_call["nothing exits"]]
        entry: dict = {"exit_fractions": [round(float(f), 4) for f in fractions], "expected_flops": expected,
                       "ideal_speedup": ideal}
        for c, clock in enumerate(("wall", "cpu")):
            measured = float(per_call["baseline"][c] / per_call["gated"][c])
            rounds = times["baseline"][:, :, c].sum(axis=1) / times["gated"][:, :, c].sum(axis=1)
            # The speed-up a scheduler without overhead would reach if each sample cost what its exit
            # costs when everyone takes it: isolates the backbone's uneven time per FLOP across segments.
            time_model = float(per_call["baseline"][c] / expected_cost([t[c] for t in exit_times], fractions))
            entry[clock] = {
                "measured_speedup": measured, "efficiency": measured / ideal,
                "speedup_per_round": [round(float(r), 3) for r in rounds],
                "exit_time_model_speedup": time_model, "measured_vs_exit_time_model": measured / time_model,
                "ms_per_batch": {k: float(v[c]) * 1e3 for k, v in per_call.items()},
                "per_gate_overhead_us": float((per_call["nothing exits"][c] - per_call["baseline"][c]) / K * 1e6),
            }
        report["batches"][str(batch)] = entry

        print(f"batch {batch}: exits {entry['exit_fractions']}, expected {expected / 1e6:.2f} of "
              f"{base_flops / 1e6:.2f} MFLOPs per sample -> ideal speed-up {ideal:.2f}x")
        for clock in ("wall", "cpu"):
            e = entry[clock]
            print(f"  {clock:4s} ms/batch: " + ", ".join(f"{k} {v:.3f}" for k, v in e["ms_per_batch"].items()))
            print(f"       speed-up {e['measured_speedup']:.2f}x -> efficiency {e['efficiency']:.2f} "
                  f"(whole rounds {', '.join(f'{r:.2f}' for r in e['speedup_per_round'])}); from exit times "
                  f"{e['exit_time_model_speedup']:.2f}x; per-gate overhead {e['per_gate_overhead_us']:.0f} us")
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    out = args.out or ROOT / "benchmarks" / "results" / f"runtime_speedup-{Path(bundle).name}.json"
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
