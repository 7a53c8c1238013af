"""The runtime's execution modes side by side, against the un-gated model: one script for CPU and GPU.

    .venv/bin/python benchmarks/runtime_modes.py --bundle engines/bench-resnet56 --providers cpu
    python benchmarks/runtime_modes.py --bundle engines/bench-resnet56 --resnet50 engines/bench-resnet50 \\
        --providers cuda --batch-sizes 1,64,256 --out benchmarks/results/gpu/runtime_modes.json

Modes (each a GatedRuntime on the same bundle and provider; `--modes` picks them):

- `plain`: today's default for the provider (CPU: exact batch sizes; CUDA: power-of-two buckets, a
  session per bucket).
- `fixed`: fixed-address buffers bound once per (segment, bucket) (`fixed_buffers=True`), compacting at
  every gate.
- `fixed+table`: the same, deciding compact-or-pad per gate from `profile_buckets()`'s table.
- `graphs`, `graphs+table`: `cuda_graphs=True` (CUDA provider only): each slot captured and replayed.

The un-gated model runs as `baseline` (the plain runner) and, where a fixed or graphs mode is measured,
as `baseline-fixed` / `baseline-graphs` (the same options: at a bucket batch size it runs from a fixed
slot, with a CUDA graph under `graphs`). Every mode and baseline is timed interleaved call by call on
the same batches, in a seeded random order, so drift and cache effects hit all alike; figures are medians per call. The ideal
speed-up comes from the FLOPs of the exits the timed batches took. Exits of every mode are compared
with `plain`'s on every batch, and the script fails (exit status 1) when more than 1% of them differ.

`--resnet50 DIR` first builds (when DIR has no bundle) torchvision's ResNet-50 at 3x`--resnet50-size`
squared (default 224) with random weights, gates after layer1, layer2 and layer3 (heads scaled so that
their confidences spread over (0, 1)), and times it on random inputs, with thresholds under which about
`--fractions` (default 60/15/10%) of the samples leave at its gates. `--bundle` bundles run with their
own (calibrated) thresholds on Fashion-MNIST test images.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_speedup import thresholds_for

from dgate_export.compile.build import BuildOptions
from dgate_export.runtime import GatedRuntime

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "plain": {},
    "fixed": {"fixed_buffers": True},
    "fixed+table": {"fixed_buffers": True},
    "graphs": {"cuda_graphs": True},
    "graphs+table": {"cuda_graphs": True},
}


def build_resnet50(out: Path, size: int, x: np.ndarray, exporter: str) -> Path:
    """torchvision ResNet-50 (random weights, 10 classes) gated after layer1-3, built for ONNX Runtime."""
    import torch

    from dgate_export.compile import checkpoint, zoo
    from dgate_export.compile.build import build_bundle
    from dgate_export.compile.model import GatedModel

    torch.manual_seed(0)
    arch = "torchvision/resnet50"
    kwargs = {"num_classes": 10}
    model = GatedModel.attach(zoo.build_backbone(arch, kwargs), list(zoo.arch_info(arch).default_exits),
                              arch={"name": arch, "kwargs": kwargs}, num_classes=10, input_shape=(3, size, size))
    model.eval()
    with torch.no_grad():  # random heads saturate softmax: scale each so its logits have std 2 here
        sample = torch.from_numpy(x[:32])
        for head, logits in zip(model.heads, model(sample)[:-1]):
            for p in head.parameters():
                p.mul_(2.0 / max(float(logits.std()), 1e-6))
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(model, Path(tmp) / "resnet50.pt")
        return build_bundle(path, out, BuildOptions(max_batch=256, force=True, exporter=exporter),
                            progress=print)


def time_modes(calls: dict, batches: list[np.ndarray], rounds: int) -> dict[str, np.ndarray]:
    """Seconds per call [call, (wall, thread CPU)] of every entry of `calls`, interleaved batch by batch in
    a seeded random order (a fixed rotation would always run some entry right after another that warmed
    the caches for it, e.g. a +table mode after the mode whose runners it shares). On a CPU provider with one thread, the calling thread's CPU time is the
    cross-check that other processes cannot inflate (on a loaded machine they stretch long calls more
    than short ones); on a GPU only wall-clock time means anything."""
    names = list(calls)
    for b in batches[:2]:  # warm-up: allocators, caches, first runs at this size
        for name in names:
            calls[name](b)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for b in batches:
            for i in rng.permutation(len(names)):
                name = names[i]
                t0, c0 = time.perf_counter(), time.thread_time()
                calls[name](b)
                times[name].append((time.perf_counter() - t0, time.thread_time() - c0))
    return {name: np.asarray(ts) for name, ts in times.items()}


def measure_bundle(bundle: Path, x: np.ndarray, args, modes: list[str], own_thresholds: bool) -> dict:
    base_options = {"providers": args.providers}
    runtimes: dict[str, GatedRuntime] = {}
    t0 = time.perf_counter()
    failures = []
    for mode in modes:
        if mode.endswith("+table") and mode.split("+")[0] in runtimes:
            # The same runners (sessions, slots, graphs) with a table of its own: fewer sessions to make.
            runtimes[mode] = copy.copy(runtimes[mode.split("+")[0]])
        elif mode == "plain" or "+" not in mode:
            try:
                runtimes[mode] = GatedRuntime.load(bundle, **base_options, **MODES[mode])
            except Exception as err:  # e.g. a CUDA graph the provider refuses: the other modes still run
                if mode == "plain":
                    raise
                failures.append(f"{bundle.name}: mode {mode} does not load: {err}")
                print("FAILED:", failures[-1], flush=True)
    plain = runtimes["plain"]
    thresholds = (list(plain.thresholds) if own_thresholds
                  else thresholds_for(plain, x[: args.calibrate], args.fractions))
    tables = {}
    for mode, rt in runtimes.items():
        rt.thresholds = thresholds
        rt.warmup()  # without a table every slot is reachable: all are made (and captured) here
        if mode.endswith("+table"):
            rt.bucket_times = tables[mode] = rt.profile_buckets(repeats=args.profile_repeats)
    setup_s = time.perf_counter() - t0
    baselines = {"baseline": plain.baseline_runner()}
    for family in ("fixed", "graphs"):
        if family in runtimes:
            baselines[f"baseline-{family}"] = runtimes[family].baseline_runner()
    costs = plain.manifest.exit_costs()
    base_flops = float(plain.manifest.baseline.flops or costs[-1])
    report: dict = {"bundle": str(bundle), "modes": list(runtimes), "name": plain.manifest.name, "thresholds": thresholds,
                    "setup_seconds": setup_s, "tables": {m: [{str(b): t for b, t in seg.items()} for seg in tab]
                                                         for m, tab in tables.items()},
                    "providers": getattr(baselines["baseline"], "providers", None), "batches": {}}
    for bs in args.batch_sizes:
        n_batches = max(1, min(args.batches * (16 if bs == 1 else 1), len(x) // bs))
        batches = [x[i * bs:(i + 1) * bs] for i in range(n_batches)]
        ref = [plain.run(b) for b in batches]
        counts = sum(r.exit_counts for r in ref)
        fractions = counts / counts.sum()
        ideal = base_flops / float(np.dot(fractions, costs))
        mismatch = {}
        for mode, rt in runtimes.items():
            diff = sum(int((rt.run(b).exits != r.exits).sum()) for b, r in zip(batches, ref))
            mismatch[mode] = diff / (bs * n_batches)
            if mismatch[mode] > 0.01:
                failures.append(f"{bundle.name} batch {bs}: {mode} exits differ from plain's on "
                                f"{100 * mismatch[mode]:.1f}% of the samples")
        calls = {name: (lambda b, r=r: r.run({"input": b}, host={"logits"})) for name, r in baselines.items()}
        calls.update({mode: (lambda b, rt=rt: rt.run(b)) for mode, rt in runtimes.items()})
        times = time_modes(calls, batches, max(1, args.rounds if bs > 1 else args.rounds * 4))
        clock = 1 if args.clock == "cpu" else 0
        median = {name: float(np.median(ts[:, clock])) for name, ts in times.items()}
        entry = {"clock": args.clock, "exit_fractions": [round(float(f), 4) for f in fractions],
                 "ideal_speedup": ideal, "ms": {name: 1e3 * v for name, v in median.items()},
                 "ms_wall_median": {name: 1e3 * float(np.median(ts[:, 0])) for name, ts in times.items()},
                 "ms_cpu_median": {name: 1e3 * float(np.median(ts[:, 1])) for name, ts in times.items()},
                 "ms_wall_mean": {name: 1e3 * float(np.mean(ts[:, 0])) for name, ts in times.items()},
                 "calls": len(times["baseline"]), "exit_mismatch_vs_plain": mismatch, "speedup": {}}
        best_base = min(v for k, v in median.items() if k.startswith("baseline"))
        for mode in runtimes:
            family = next((f for f in ("fixed", "graphs") if mode.startswith(f)), None)
            same = median.get(f"baseline-{family}", median["baseline"]) if family else median["baseline"]
            s_plain, s_best = median["baseline"] / median[mode], best_base / median[mode]
            entry["speedup"][mode] = {"vs_baseline": s_plain, "vs_same_options_baseline": same / median[mode],
                                      "vs_best_baseline": s_best, "efficiency_vs_best": s_best / ideal}
        report["batches"][str(bs)] = entry
        print(f"{bundle.name} batch {bs}: exits {entry['exit_fractions']} ideal {ideal:.2f}x; {args.clock} ms " +
              ", ".join(f"{k} {v:.3f}" for k, v in entry["ms"].items()), flush=True)
        for mode, s in entry["speedup"].items():
            print(f"    {mode:13s} {s['vs_baseline']:.2f}x vs baseline, {s['vs_best_baseline']:.2f}x vs the best "
                  f"baseline (efficiency {s['efficiency_vs_best']:.2f}); exits differing from plain "
                  f"{100 * mismatch[mode]:.2f}%", flush=True)
    for mode, rt in runtimes.items():
        if "+" not in mode:  # copies share their original's runners
            rt.close()
    report["failures"] = failures
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, action="append", default=[], help="a bundle (repeatable)")
    ap.add_argument("--resnet50", type=Path, default=None, help="also build (if absent) and time ResNet-50 here")
    ap.add_argument("--resnet50-size", type=int, default=224)
    ap.add_argument("--resnet50-samples", type=int, default=512)
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"],
                    help="how the ResNet-50 bundle is exported (dynamo needs onnxscript)")
    ap.add_argument("--providers", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default=None, help="comma-separated (default: plain,fixed,fixed+table, and "
                    "graphs,graphs+table with cuda)")
    ap.add_argument("--batch-sizes", default="1,64,256")
    ap.add_argument("--batches", type=int, default=4, help="batches per size (cycled through every round)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile-repeats", type=int, default=5)
    ap.add_argument("--calibrate", type=int, default=1024, help="samples the thresholds are chosen on")
    ap.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=[0.6, 0.15, 0.1])
    ap.add_argument("--fractions-for-bundles", action="store_true",
                    help="--bundle bundles too get thresholds from --fractions (default: their own)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default=None,
                    help="what speed-ups use: the calling thread's CPU time (default on cpu) or wall-clock "
                         "time (default, and the only meaningful one, on cuda); both are recorded")
    ap.add_argument("--out", type=Path, required=True, help="JSON report")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    args.clock = args.clock or ("cpu" if args.providers == "cpu" else "wall")
    modes = (args.modes.split(",") if args.modes else
             ["plain", "fixed", "fixed+table"] + (["graphs", "graphs+table"] if args.providers == "cuda" else []))
    unknown = [m for m in modes if m not in MODES]
    if unknown or modes[0] != "plain":
        ap.error(f"--modes must start with plain and name only {', '.join(MODES)}; got {modes}")

    report = {"command": shlex.join(["python", *sys.argv]),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "platform": platform.platform(), "load_average_at_start": list(os.getloadavg())},
              "providers": args.providers, "modes": modes, "bundles": []}
    try:
        import onnxruntime

        report["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    jobs: list[tuple[Path, np.ndarray]] = []
    if args.bundle:
        from dgate_export.data import load_dataset

    for bundle in args.bundle:
        rt = GatedRuntime.load(bundle)
        data = load_dataset("fashion-mnist", "test", channels=rt.input_shape[0])
        jobs.append((bundle, np.ascontiguousarray(data.x[: max(args.calibrate, 256 * args.batches)])))
        rt.close()
    if args.resnet50 is not None:
        size = args.resnet50_size
        x = np.random.default_rng(0).standard_normal((args.resnet50_samples, 3, size, size), dtype=np.float32)
        if not (args.resnet50 / "manifest.json").is_file():
            t0 = time.perf_counter()
            build_resnet50(args.resnet50, size, x, args.exporter)
            report["resnet50_build_seconds"] = time.perf_counter() - t0
        jobs.append((args.resnet50, x))
    failures = []
    for bundle, x in jobs:
        own = bundle != args.resnet50 and not args.fractions_for_bundles
        try:
            entry = measure_bundle(bundle, x, args, modes, own)
        except Exception as err:  # noqa: BLE001 (recorded, reported at the end; the other bundles run)
            traceback.print_exc()
            entry = {"bundle": str(bundle), "failures": [f"{bundle.name}: {type(err).__name__}: {err}"]}
        report["bundles"].append(entry)
        failures += entry["failures"]
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    for f in failures:
        print("FAILED:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
