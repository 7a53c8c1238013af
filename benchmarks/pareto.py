"""Is gating worth it? Gated ResNets against the static ones a user would pick instead (issue 28).

    .venv/bin/python benchmarks/pareto.py                   # everything (resumable): train, gate, build, measure, plot
    .venv/bin/python benchmarks/pareto.py --steps measure,plot --seconds 300
    .venv/bin/python benchmarks/pareto.py --steps plot      # table + plot again from results/pareto.json

On Fashion-MNIST, the zoo's ResNet-20, 32, 44, 56 and 110 (stem_stride 1, full 28x28 resolution), each
trained with one recipe (train_backbones.py: 5 epochs, batch 128, one-cycle lr 0.1, seed 0, 10 000
validation rows held out), then:
1. train: `train_backbones.py NETWORK --epochs 5 --fresh --threads T` for a backbone whose weights are
   missing (benchmarks/weights/NETWORK.pth);
2. gate: `dgate-export gate` with the zoo's default exits, grid heads and the default promise (a drop of
   at most 1 point on new data with probability >= 90%), thresholds chosen on the 10 000 validation rows
   -> runs/pareto/NETWORK_gated.pt (logs of steps 2-4: results/pareto/);
3. build: the fp32 bundle (engines/pareto-NETWORK) and the int8 bundle (engines/pareto-NETWORK-int8:
   `--precision int8 --calibration-data fashion-mnist`, thresholds refitted on the int8 graphs with the
   same default promise); the un-gated point of a bundle is its own baseline.onnx;
4. tighten (extra points, not the issue's): a copy of every bundle per tighter promise (a drop of at
   most 0.25 or 0.5 points), its thresholds refitted by `dgate-export calibrate --engine`; and
   resnet20-early, ResNet-20 gated with earlier exits (EARLY_EXITS), through steps 2-3 like the others;
5. measure: accuracy of every point (the issue's 20: 5 networks x un-gated/gated x fp32/int8, and the
   extras) on the whole 10 000-row test split, then ONE interleaved timing run over all of them at batch
   1 and 256 on ONNX Runtime (CPU, one intra-op thread per session, the project's default): every round
   runs each point on the same batch, the order rotated by one each round, and time slices of batch 256
   and batch 1 alternate, so drift of a shared machine hits every point alike. Throughput = batch /
   mean latency (samples/s). A tighter promise runs the same bundle with the copy's thresholds;
6. plot: benchmarks/plots/pareto.png (accuracy vs throughput, log x, the Pareto front of the issue's
   points and of all points; batch 256 and batch 1 panels) and the markdown tables (printed).
Steps 1-4 skip what exists unless --fresh. Writes benchmarks/results/pareto.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's dgate_export, not another one installed in the venv

from dgate_export.bench import _versions, latency_stats, quality
from dgate_export.contract import INPUT
from dgate_export.data import load_dataset
from dgate_export.runtime import GatedRuntime

BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
LOGS = RESULTS / "pareto"  # the gate, build and calibrate logs (training logs: results/pareto_train_NETWORK.log)
CLI = str(Path(sys.executable).parent / "dgate-export")  # the console script of this venv
NETWORKS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
# Beside the points, what might change the answer (extra points, not in the goal): the smallest
# network's gates placed earlier (run 4's pattern on ResNet-56: two exits inside the first stage), ...
EARLY_EXITS = {"resnet20-early": "layer1.0,layer1.1,layer2.0"}
MODELS = NETWORKS + tuple(EARLY_EXITS)
# ... and every gated bundle's thresholds refitted (`calibrate --engine`) to tighter promises: a drop of
# at most 0.25 or 0.5 points instead of 1 (same probability 90%), the same graphs.
DEFAULT_DROP = 0.01
TIGHT_DROPS = (0.0025, 0.005)
PRECISIONS = ("fp32", "int8")
BATCH_SIZES = (256, 1)
STEPS = ("train", "gate", "build", "tighten", "measure", "plot")
RECIPE = ["--epochs", "5"]  # train_backbones.py's defaults otherwise: batch 128, lr 0.1, seed 0, val 10 000


def arch(model: str) -> str:
    return model.split("-")[0]


def gated_path(model: str) -> Path:
    return ROOT / "runs" / "pareto" / f"{model}_gated.pt"


def bundle_path(model: str, precision: str, drop: float | None = None) -> Path:
    return ROOT / "engines" / (f"pareto-{model}" + ("" if precision == "fp32" else f"-{precision}")
                               + ("" if drop is None else f"-drop{drop:g}"))


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def backbone_record(network: str) -> dict:
    return json.loads((BENCH / "weights" / f"{network}.json").read_text())


def commands(model: str) -> dict[str, list[str]]:
    """The toolkit commands of one model (run from the repository root)."""
    net = arch(model)
    record = backbone_record(net) if (BENCH / "weights" / f"{net}.json").is_file() else {
        "arch_kwargs": {"stem_stride": 1}, "val_size": 10000, "seed": 0}
    gated = rel(gated_path(model))
    out = {
        "gate": ["gate", "--arch", net, "--arch-kwargs", json.dumps(record["arch_kwargs"]),
                 "--weights", f"benchmarks/weights/{net}.pth", "--data", "fashion-mnist",
                 "--val-size", str(record["val_size"]), "--seed", str(record["seed"]), "--head", "grid",
                 *(["--exits", EARLY_EXITS[model]] if model in EARLY_EXITS else []), "--no-progress", "-o", gated],
        "fp32": ["build", gated, "-o", rel(bundle_path(model, "fp32"))],
        "int8": ["build", gated, "-o", rel(bundle_path(model, "int8")), "--precision", "int8",
                 "--calibration-data", "fashion-mnist"],
    }
    for p in PRECISIONS:
        for d in TIGHT_DROPS:  # run on a copy of the bundle (step_tighten)
            out[f"{p}-drop{d:g}"] = ["calibrate", "--engine", rel(bundle_path(model, p, d)), "--data", "fashion-mnist",
                                     "--max-drop", f"{d:g}", "--no-progress"]
    return out


def run_logged(cmd: list[str], log: Path, threads: int) -> None:
    """Run cmd from the repository root with this checkout's package first, appending to log."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n# started {datetime.now(timezone.utc).isoformat(timespec='seconds')}, "
                f"load {os.getloadavg()[0]:.1f}\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
        f.write(f"# exit {done.returncode}, {(time.perf_counter() - started) / 60:.1f} min, "
                f"load {os.getloadavg()[0]:.1f}\n")
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def step_train(models, args) -> None:
    for n in dict.fromkeys(arch(m) for m in models):
        if (BENCH / "weights" / f"{n}.pth").is_file() and not args.fresh:
            continue
        cmd = [sys.executable, rel(BENCH / "train_backbones.py"), n, *RECIPE, "--fresh", "--threads", str(args.threads)]
        print(f"train {n}: {' '.join(cmd[1:])}", flush=True)
        run_logged(cmd, RESULTS / f"pareto_train_{n}.log", args.threads)


def step_gate(models, args) -> None:
    for m in models:
        if gated_path(m).is_file() and not args.fresh:
            continue
        print(f"gate {m}", flush=True)
        log = LOGS / f"gate_{m}.log"
        log.unlink(missing_ok=True)
        gated_path(m).unlink(missing_ok=True)
        run_logged([CLI, *commands(m)["gate"]], log, args.threads)


def step_build(models, args) -> None:
    for m in models:
        for p in PRECISIONS:
            if (bundle_path(m, p) / "manifest.json").is_file() and not args.fresh:
                continue
            cmd = [CLI, *commands(m)[p], *(["--force"] if bundle_path(m, p).exists() else [])]
            print(f"build {m} {p}", flush=True)
            run_logged(cmd, LOGS / f"build_{m}_{p}.log", args.threads)


def step_tighten(models, args) -> None:
    """A copy of each bundle per tighter promise, its thresholds refitted by `calibrate --engine`."""
    for m in models:
        for p in PRECISIONS:
            for d in TIGHT_DROPS:
                out = bundle_path(m, p, d)
                if (out / "manifest.json").is_file() and not args.fresh:
                    continue
                tmp = out.with_name(out.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(bundle_path(m, p), tmp)
                cmd = [CLI, *commands(m)[f"{p}-drop{d:g}"]]
                cmd[cmd.index("--engine") + 1] = rel(tmp)
                print(f"tighten {m} {p} to a drop of {d:g}", flush=True)
                log = LOGS / f"tighten_{m}_{p}_drop{d:g}.log"
                log.unlink(missing_ok=True)
                run_logged(cmd, log, args.threads)
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)


# ------------------------------------------------------------------------------------------ measure

def load_points(models) -> tuple[list[dict], dict]:
    """Every point: accuracy, exits and FLOPs on the whole test split, and a callable that runs one batch.
    A model's static point is its bundle's baseline.onnx (once per network); its gated points are the
    bundle with its own thresholds (the default promise) and with the tighter promises' thresholds."""
    test = load_dataset("fashion-mnist", "test")
    points, runs = [], {}
    for m in models:
        for p in PRECISIONS:
            rt = GatedRuntime.load(bundle_path(m, p))
            base = rt.baseline_runner()
            manifest = rt.manifest
            costs = manifest.exit_costs()
            base_flops = float(manifest.baseline.flops or costs[-1])
            common = {"model": m, "network": arch(m), "depth": int(arch(m)[len("resnet"):]), "precision": p,
                      "exits": "early" if m in EARLY_EXITS else "zoo"}
            variants = [(DEFAULT_DROP, None)]
            for d in TIGHT_DROPS:
                if (bundle_path(m, p, d) / "manifest.json").is_file():
                    tight = GatedRuntime.load(bundle_path(m, p, d))
                    variants.append((d, tight.thresholds))
                    tight.close()
            for d, thr in variants:
                q = quality(rt, base, test.x, test.y, costs, base_flops, thresholds=thr)
                if d == DEFAULT_DROP and m not in EARLY_EXITS:
                    points.append({**common, "key": f"{m}/static/{p}", "gated": False, "promise": None,
                                   "accuracy": q["accuracy"]["baseline"], "flops": base_flops, "flops_saved": 0.0,
                                   "bundle": rel(bundle_path(m, p)) + "/baseline.onnx"})
                    runs[points[-1]["key"]] = lambda b, base=base: base.run({INPUT: b})
                kind = "gated" if d == DEFAULT_DROP else f"gated-drop{d:g}"
                points.append({**common, "key": f"{m}/{kind}/{p}", "gated": True, "promise": d,
                               "accuracy": q["accuracy"]["gated"], "flops": q["flops"]["expected"],
                               "flops_saved": q["flops"]["reduction"], "thresholds": q["thresholds"],
                               "exit_fractions": q["exits"]["fractions"],
                               "accuracy_per_exit": q["accuracy"]["per_exit"],
                               "bundle": rel(bundle_path(m, p)) + ("" if thr is None else
                                                                   f" (thresholds of {rel(bundle_path(m, p, d))})")})
                runs[points[-1]["key"]] = lambda b, rt=rt, thr=thr: rt.run(b, thresholds=thr)
                print(f"{m} {p} max-drop {d:g}: un-gated {q['accuracy']['baseline']:.2%}, "
                      f"gated {q['accuracy']['gated']:.2%}, FLOPs saved {q['flops']['reduction']:.1%}", flush=True)
    return points, {"runs": runs, "x": test.x}


def time_all(runs: dict, x: np.ndarray, *, seconds: float, slice_s: float, warmup_rounds: int) -> dict:
    """One interleaved timing run over every config and batch size (see the module docstring).
    Returns per batch size: config -> latency stats (ms), rounds, and the load averages seen."""
    names = list(runs)
    state = {b: {"round": 0, "times": {k: [] for k in names}, "load": []} for b in BATCH_SIZES}

    # Batch 1 visits the test rows in a seeded order (a short run still sees every kind of row);
    # larger batches are consecutive test batches. Both cycle.
    order = np.random.default_rng(0).permutation(len(x))

    def batch(b: int, i: int) -> np.ndarray:
        if b == 1:
            j = order[i % len(x)]
            return x[j:j + 1]
        j = i % (len(x) // b)
        return x[j * b:(j + 1) * b]

    def one_round(b: int, record: bool) -> None:
        s = state[b]
        i = s["round"]
        xb = batch(b, i)
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            runs[name](xb)
            dt = time.perf_counter() - t0
            if record:
                s["times"][name].append(dt)
        s["round"] = i + 1

    for b in BATCH_SIZES:
        for _ in range(warmup_rounds):
            one_round(b, False)
        state[b]["round"] = 0
    start = time.perf_counter()
    slices = 0
    while time.perf_counter() - start < seconds or any(state[b]["round"] < 3 for b in BATCH_SIZES):
        last = slice_s
        for b in BATCH_SIZES:  # a slice of batch 1 lasts as long as the batch-256 slice before it
            t0 = time.perf_counter()
            one_round(b, True)
            while time.perf_counter() - t0 < last:
                one_round(b, True)
            last = max(slice_s, time.perf_counter() - t0)
            state[b]["load"].append(os.getloadavg())
        slices += 1
        done = {b: state[b]["round"] for b in BATCH_SIZES}
        print(f"  {time.perf_counter() - start:.0f} s: rounds {done}, load {os.getloadavg()[0]:.1f}", flush=True)
    return {str(b): {"rounds": state[b]["round"], "slices": slices,
                     "load_average": {"min": min(v[0] for v in state[b]["load"]),
                                      "max": max(v[0] for v in state[b]["load"]),
                                      "samples": state[b]["load"]},
                     "latency_ms": {k: latency_stats(t) for k, t in state[b]["times"].items()},
                     # throughput in each quarter of the run (the same rounds for every point): the drift
                     "quarters": {k: [b * len(q) / float(np.sum(q)) for q in np.array_split(np.asarray(t), 4)]
                                  for k, t in state[b]["times"].items()}}
            for b in BATCH_SIZES}


def step_measure(models, args) -> dict:
    load_before = os.getloadavg()
    points, ctx = load_points(models)
    print(f"timing {len(points)} points x batch {list(BATCH_SIZES)} for {args.seconds:g} s "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    timing = time_all(ctx["runs"], ctx["x"], seconds=args.seconds, slice_s=args.slice_seconds,
                      warmup_rounds=args.warmup_rounds)
    for pt in points:
        pt["throughput"] = {b: int(b) / (t["latency_ms"][pt["key"]]["mean"] / 1e3) for b, t in timing.items()}
        pt["latency_ms"] = {b: t["latency_ms"][pt["key"]] for b, t in timing.items()}
        pt["throughput_quarters"] = {b: t["quarters"][pt["key"]] for b, t in timing.items()}
    nets = list(dict.fromkeys(arch(m) for m in models))
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/pareto.py " + " ".join(sys.argv[1:]),
        "recipe": {n: backbone_record(n) for n in nets},
        "gate_minutes": {m: gate_minutes(m) for m in models},
        "commands": {m: {k: "dgate-export " + " ".join(c) for k, c in commands(m).items()} for m in models},
        "timing": {"seconds": args.seconds, "slice_seconds": args.slice_seconds,
                   "warmup_rounds": args.warmup_rounds, "backend": "onnxruntime (CPU), intra_op_num_threads 1",
                   "rounds": {b: t["rounds"] for b, t in timing.items()},
                   "load_average": {"before": load_before, "after": os.getloadavg(),
                                    **{f"batch_{b}": {k: t["load_average"][k] for k in ("min", "max")}
                                       for b, t in timing.items()}},
                   "load_samples": {b: t["load_average"]["samples"] for b, t in timing.items()}},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": _versions("onnxruntime"),
        "points": points,
    }
    result["analysis"] = analyse_all(points)
    out = RESULTS / "pareto.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {rel(out)}", flush=True)
    return result


def gate_minutes(model: str) -> float | None:
    """How long `dgate-export gate` took (from its log), or None."""
    log = LOGS / f"gate_{model}.log"
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("# exit 0,")] if log.is_file() else []
    return float(lines[-1].split(",")[1].split()[0]) if lines else None


# ------------------------------------------------------------------------------------------ analysis

def front(points: list[dict], b: str) -> list[str]:
    """Keys of the points no other point beats on both accuracy and throughput at batch b."""
    keep = []
    for p in points:
        beaten = any(q["accuracy"] >= p["accuracy"] and q["throughput"][b] >= p["throughput"][b]
                     and (q["accuracy"] > p["accuracy"] or q["throughput"][b] > p["throughput"][b])
                     for q in points)
        if not beaten:
            keep.append(p["key"])
    return keep


def fastest_at(points: list[dict], b: str, accuracy: float) -> dict | None:
    """The fastest of points at equal or better accuracy than `accuracy`, or None."""
    ok = [p for p in points if p["accuracy"] >= accuracy]
    return max(ok, key=lambda p: p["throughput"][b]) if ok else None


def is_main(p: dict) -> bool:
    """The issue's points: static, or gated with the zoo's exits and the default promise."""
    return not p["gated"] or (p["exits"] == "zoo" and p["promise"] == DEFAULT_DROP)


def analyse(points: list[dict]) -> dict:
    """Pareto fronts and the issue's goal, per batch size.

    For each precision and each static point s on the static front: the fastest gated point of that
    precision at equal or better test accuracy than s, against s
    (levels only at the static front's points: another static point would be slower or less accurate).
    The goal (batch 256) reads at the best static point, the most accurate one; the ratio at every other
    accuracy level is reported beside it."""
    out: dict = {}
    for b in sorted({b for p in points for b in p["throughput"]}, key=int):
        entry: dict = {"front": front(points, b), "by_precision": {}}
        for prec in PRECISIONS:
            static = [p for p in points if p["precision"] == prec and not p["gated"]]
            gated = [p for p in points if p["precision"] == prec and p["gated"]]
            levels = []
            for s in sorted(static, key=lambda p: p["accuracy"]):
                if fastest_at(static, b, s["accuracy"]) is not s:
                    continue  # a faster static point is at least as accurate: its level covers this one
                g = fastest_at(gated, b, s["accuracy"])
                level = {"accuracy": s["accuracy"], "static": s["key"], "static_throughput": s["throughput"][b],
                         "gated": g["key"] if g else None, "gated_accuracy": g["accuracy"] if g else None,
                         "gated_throughput": g["throughput"][b] if g else None,
                         "ratio": g["throughput"][b] / s["throughput"][b] if g else None}
                if g and "throughput_quarters" in g:  # the ratio in each quarter of the timing run
                    level["ratio_quarters"] = [tg / ts for tg, ts in zip(g["throughput_quarters"][b],
                                                                        s["throughput_quarters"][b])]
                levels.append(level)
            top = levels[-1]
            entry["by_precision"][prec] = {
                "levels": levels, "static_front": front(static, b), "gated_front": front(gated, b),
                "best_static": top["static"], "ratio_at_best_static": top["ratio"],
                "goal_1.5x_at_best_static": bool(top["ratio"] is not None and top["ratio"] >= 1.5),
                "best_ratio": max((lv["ratio"] for lv in levels if lv["ratio"] is not None), default=None)}
        entry["gated_int8_on_front"] = [k for k in entry["front"] if "/gated" in k and k.endswith("/int8")]
        out[b] = entry
    return out


def analyse_all(points: list[dict]) -> dict:
    return {"main": analyse([p for p in points if is_main(p)]), "all": analyse(points)}


# ------------------------------------------------------------------------------------------ report

COLOR = {"fp32": "tab:blue", "int8": "tab:orange"}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    by_key = {p["key"]: p for p in points}
    batches = [b for b in ("256", "1") if b in points[0]["throughput"]]
    fig, axes = plt.subplots(1, len(batches), figsize=(8.5 * len(batches), 6.8), squeeze=False)
    for ax, b in zip(axes[0], batches):
        def xy(pts: list[dict], b: str = b) -> tuple[list[float], list[float]]:
            return [p["throughput"][b] for p in pts], [100 * p["accuracy"] for p in pts]

        for prec, color in COLOR.items():
            static = sorted((p for p in points if p["precision"] == prec and not p["gated"]), key=lambda p: p["depth"])
            gated = sorted((p for p in points if p["precision"] == prec and is_main(p) and p["gated"]),
                           key=lambda p: p["depth"])
            for pts, marker, fill, style, label in ((static, "o", "none", ":", f"static {prec}"),
                                                    (gated, "^", color, "-", f"gated {prec}")):
                xs, ys = xy(pts)
                ax.plot(xs, ys, linestyle=style, color=color, alpha=0.6, linewidth=1)
                ax.scatter(xs, ys, marker=marker, s=60, facecolors=fill, edgecolors=color, label=label, zorder=3)
                for p, xv, yv in zip(pts, xs, ys):
                    ax.annotate(str(p["depth"]), (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=color)
            # each gated model's path: static -> tighter promises -> default promise (and earlier exits)
            for m in dict.fromkeys(p["model"] for p in points):
                path_pts = [by_key[k] for k in ([f"{arch(m)}/static/{prec}"]
                                                 + [f"{m}/gated-drop{d:g}/{prec}" for d in TIGHT_DROPS]
                                                 + [f"{m}/gated/{prec}"]) if k in by_key]
                xs, ys = xy(path_pts)
                early = m in EARLY_EXITS
                ax.plot(xs, ys, color=color, alpha=0.35, linewidth=0.8, linestyle="--" if early else "-")
                extra = [p for p in path_pts if p["gated"] and not is_main(p)]
                ex, ey = xy(extra)
                ax.scatter(ex, ey, marker="D" if early else "^", s=22, facecolors="none", edgecolors=color,
                           linewidths=0.8, zorder=3)
        ax.scatter([], [], marker="^", s=22, facecolors="none", edgecolors="gray",
                   label=f"gated, tighter promise (drop ≤ {', '.join(f'{100 * d:g}' for d in TIGHT_DROPS)} pt)")
        ax.scatter([], [], marker="D", s=22, facecolors="none", edgecolors="gray",
                   label="gated, earlier exits: " + ", ".join(f"{m} ({e})" for m, e in EARLY_EXITS.items()))
        for which, color, style, size, label in (("main", "black", "--", 170, "Pareto front (issue's points)"),
                                                 ("all", "gray", ":", 0, "Pareto front (all points)")):
            fr = sorted((by_key[k] for k in result["analysis"][which][b]["front"]), key=lambda p: p["throughput"][b])
            xs, ys = xy(fr)
            ax.step(xs, ys, where="post", color=color, linestyle=style, linewidth=1, label=label, zorder=2)
            if size:
                ax.scatter(xs, ys, s=size, facecolors="none", edgecolors=color, linewidths=0.8, zorder=2)
        ax.set_xscale("log")
        ax.set_xlabel(f"throughput at batch {b}, samples/s (ONNX Runtime, 1 CPU thread per session, log scale)")
        ax.set_ylabel("test accuracy, % (10 000 images)")
        load = result["timing"]["load_average"][f"batch_{b}"]
        depths = sorted({p["depth"] for p in points})
        ax.set_title(f"Fashion-MNIST, ResNet-{'/'.join(map(str, depths))}, batch {b} "
                     f"(load average {load['min']:.1f}-{load['max']:.1f})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed_cells(s: dict, g: dict) -> list[str]:
    return [f"{s['throughput'][b]:,.0f} → {g['throughput'][b]:,.0f} ({g['throughput'][b] / s['throughput'][b]:.2f}×)"
            if b in s["throughput"] else "–" for b in ("256", "1")]


def table(result: dict) -> str:
    """The markdown tables: the issue's points (one row per network and precision), then the extras."""
    by_key = {p["key"]: p for p in result["points"]}
    fronts = {b: set(a["front"]) for b, a in result["analysis"]["main"].items()}
    head = ("| network | precision | accuracy un-gated → gated | FLOPs un-gated → gated (saved) | "
            "b256 samples/s un-gated → gated (×) | b1 samples/s un-gated → gated (×) | on the front b256 / b1 |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for n in NETWORKS:
        for prec in PRECISIONS:
            s, g = by_key.get(f"{n}/static/{prec}"), by_key.get(f"{n}/gated/{prec}")
            if s is None or g is None:
                continue
            cells = speed_cells(s, g)
            marks = " / ".join(
                ", ".join(w for w, p in (("un-gated", s), ("gated", g)) if p["key"] in fronts.get(b, ())) or "–"
                for b in ("256", "1"))
            lines.append(f"| {n} | {prec} | {100 * s['accuracy']:.2f}% → {100 * g['accuracy']:.2f}% | "
                         f"{s['flops'] / 1e6:.1f}M → {g['flops'] / 1e6:.1f}M ({g['flops_saved']:.1%}) | "
                         f"{cells[0]} | {cells[1]} | {marks} |")
    extras = [p for p in result["points"] if p["gated"] and not is_main(p)]
    if extras:
        fronts_all = {b: set(a["front"]) for b, a in result["analysis"]["all"].items()}
        lines += ["", ("| model (exits) | precision | promise: drop ≤ | accuracy un-gated → gated | FLOPs saved | "
                  "b256 samples/s un-gated → gated (×) | b1 samples/s un-gated → gated (×) | on the all-points front "
                  "b256 / b1 |"), "|---|---|---|---|---|---|---|---|"]
        for g in sorted(extras, key=lambda p: (MODELS.index(p["model"]), p["precision"], p["promise"])):
            s = by_key[f"{g['network']}/static/{g['precision']}"]
            cells = speed_cells(s, g)
            marks = " / ".join("yes" if g["key"] in fronts_all.get(b, ()) else "–" for b in ("256", "1"))
            lines.append(f"| {g['model']} ({g['exits']}) | {g['precision']} | {100 * g['promise']:g} pt | "
                         f"{100 * s['accuracy']:.2f}% → {100 * g['accuracy']:.2f}% | {g['flops_saved']:.1%} | "
                         f"{cells[0]} | {cells[1]} | {marks} |")
    return "\n".join(lines)


def goal_lines(result: dict) -> str:
    out = []
    for which, analysis in result["analysis"].items():
        for b, a in analysis.items():
            for prec, r in a["by_precision"].items():
                lv = "; ".join(
                    f"≥{100 * x['accuracy']:.2f}%: {x['static'].split('/')[0]} {x['static_throughput']:,.0f}"
                    + (f" vs {x['gated'].rsplit('/', 1)[0]} {x['gated_throughput']:,.0f} ({x['ratio']:.2f}×)"
                       if x["gated"] else " vs no gated point") for x in r["levels"])
                out.append(f"[{which}] batch {b} {prec}: {lv}")
            out.append(f"[{which}] batch {b}: front {a['front']}; gated int8 on it: {a['gated_int8_on_front'] or 'none'}")
    return "\n".join(out)


def step_plot(result: dict | None) -> None:
    if result is None:
        result = json.loads((RESULTS / "pareto.json").read_text())
    result["analysis"] = analyse_all(result["points"])
    out = BENCH / "plots" / "pareto.png"
    plot(result, out)
    print(table(result))
    print(goal_lines(result))
    print(f"wrote {rel(out)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--fresh", action="store_true", help="redo the train/gate/build/tighten steps asked for")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of training, gating and building")
    parser.add_argument("--seconds", type=float, default=1500.0, help="length of the timing run")
    parser.add_argument("--slice-seconds", type=float, default=5.0, help="least time per batch size before switching")
    parser.add_argument("--warmup-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    models = [n for n in args.models.split(",") if n]
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS] + [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown: {unknown}")
    result = None
    for name in STEPS:
        if name not in steps:
            continue
        if name == "measure":
            result = step_measure(models, args)
        elif name == "plot":
            step_plot(result)
        else:
            {"train": step_train, "gate": step_gate, "build": step_build, "tighten": step_tighten}[name](models, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
