"""Terminal tables and PNG plots: the one place that uses rich and matplotlib.

Compute modules return data (bench's report dict, calibrate's `Calibration` / `Evaluation`, a
`Manifest` with its `FileCheck`s, checkpoint's `CheckpointSummary`); the CLI hands it to a function
here. rich and matplotlib are imported inside the functions, so importing this module costs nothing
and `dgate_export.runtime` never pulls them in. matplotlib comes with the `[plot]` (and `[compile]`)
extra, not the plain install: a figure asked for without it is a UserError naming the extra
(`require_matplotlib`, which a command may call before its long work).

    bench_tables, bench_figure / bench_plot                 dgate-export bench [--plot]
    calibration_tables, calibration_figure / calibration_plot   gate, calibrate (MODEL.curve.png)
    bundle_tables, checkpoint_tables                        dgate-export inspect
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contract import NEVER_EXIT
from .errors import UserError
from .files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console
    from rich.table import Table

    from .calibrate import Calibration, Evaluation
    from .compile.checkpoint import CheckpointSummary
    from .manifest import FileCheck, Manifest, TensorSpec

MIN_WIDTH = 120  # rich gives logs and pipes 80 columns: too narrow for the bench and inspect tables
PLOT_HINT = "Install it: pip install 'dgate-export[plot]'."


# --- shared pieces -----------------------------------------------------------------------------------


def si(value: float | None) -> str:
    """A count (FLOPs) in a short form: 21.9M, 512k, 37; "?" when unknown."""
    if value is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}"


def mega(value: float) -> str:
    """FLOPs in millions with two decimals (bench's tables): 1,234.57 M."""
    return f"{value / 1e6:,.2f} M"


def ms(value: float) -> str:
    """Milliseconds: one decimal from 10 ms on, three below."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3f}"


def console_for(console: Console | None = None) -> Console:
    """The console to print on: the one given, else stdout's (at least MIN_WIDTH columns into a pipe or
    log, which rich gives 80; a terminal keeps its own width)."""
    if console is not None:
        return console
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        out.width = max(out.width, MIN_WIDTH)
    return out


def table(columns: Iterable[str], title: str | None = None, *, left: Sequence[str] = (),
          show_header: bool = True) -> Table:
    """A rich Table whose columns are right-aligned (numbers) except those named in `left`."""
    from rich.table import Table

    out = Table(title=title, show_header=show_header)
    for col in columns:
        out.add_column(col, justify="left" if col in left else "right")
    return out


def save_png(fig: Figure, path: str | os.PathLike, *, dpi: float | None = None) -> Path:
    """Write a figure as PNG, atomically (no partial file on failure)."""
    fig.tight_layout()
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi="figure" if dpi is None else dpi))


def require_matplotlib() -> None:
    """Refuse to go on when matplotlib is missing, with the extra to install (the plain install has none)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise UserError(f"Drawing a plot needs matplotlib, which is not installed here ({err}); the plain "
                        "install draws nothing.", PLOT_HINT) from err


def _figure(figsize: tuple[float, float], dpi: float | None = None) -> Figure:
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


# --- bench -------------------------------------------------------------------------------------------


def bench_tables(report: dict[str, Any], *, console: Console | None = None) -> None:
    """bench's report (bench.run_bench) as tables: summary, exits, latency, speed-up, threshold sweep."""
    from .bench import LATENCY_KEYS

    console = console_for(console)
    b = report["bundle"]
    console.print(f"[bold]{_escape(b['name'])}[/] ({b['backend']}, {b['precision']}, {b['num_gates']} gates, "
                  f"{b['confidence']}) on {_escape(report['data']['description'])}")
    if b.get("providers"):
        console.print(f"execution providers {', '.join(b['providers'])}")
    console.print(f"thresholds {[round(t, 4) for t in report['thresholds']]}", markup=False)
    acc, flops = report["accuracy"], report["flops"]
    summary = table(("what", "value"), left=("what",), show_header=False)
    if acc:
        summary.add_row("accuracy gated / baseline", f"{acc['gated']:.2%} / {acc['baseline']:.2%}")
        summary.add_row("accuracy drop", f"{acc['drop_points']:.2f} points")
    summary.add_row("FLOPs per sample gated / baseline", f"{mega(flops['expected'])} / {mega(flops['baseline'])}")
    summary.add_row("FLOPs reduction", f"{flops['reduction']:.1%}")
    summary.add_row("ideal speed-up (FLOPs)", f"{flops['ideal_speedup']:.2f}x")
    console.print(summary)
    exits = table(("exit", "fraction", "accuracy", "cost (FLOPs)"), "exits")
    for k, frac in enumerate(report["exits"]["fractions"]):
        name = f"gate {k}" if k < b["num_gates"] else "final"
        a = acc["per_exit"][k] if acc else None
        exits.add_row(name, f"{frac:.1%}", "-" if a is None else f"{a:.2%}", mega(flops["exit_costs"][k]))
    console.print(exits)
    latency = table(("batch", "side", *LATENCY_KEYS, "samples/s"),
                    "latency per batch (ms), gated and baseline timed call by call in alternation")
    timed_exits = all("time_ideal_speedup" in s for s in report["speed"]) and report["speed"]
    speed = table(("batch", "iterations", "measured", "ideal (FLOPs)", "efficiency")
                  + (("ideal (time)", "runtime efficiency", "time of leaving at exit k / un-gated") if timed_exits else ()),
                  "speed-up over the un-gated baseline")
    for s in report["speed"]:
        for side in ("gated", "baseline"):
            lat = s[side]["latency_ms"]
            latency.add_row(str(s["batch_size"]), side, *(ms(lat[k]) for k in LATENCY_KEYS),
                            f"{s[side]['throughput']:,.0f}")
        extra = ([f"{s['time_ideal_speedup']:.2f}x", f"{s['runtime_efficiency']:.0%}",
                  " / ".join(f"{c:.2f}" for c in s["exit_time_costs"])] if timed_exits else [])
        speed.add_row(str(s["batch_size"]), str(s["iterations"]), f"{s['speedup']:.2f}x",
                      f"{s['ideal_speedup']:.2f}x", f"{s['efficiency']:.0%}", *extra)
    console.print(latency)
    console.print(speed)
    if report["sweep"]:
        sweep = table(("threshold", "accuracy", "FLOPs reduction", "ideal", "measured", "exit fractions"),
                      f"threshold sweep (same threshold at every gate; timing at batch "
                      f"{report['sweep'][0]['speed']['batch_size']})")
        for p in report["sweep"]:
            a = p["accuracy"]
            sweep.add_row(f"{p['thresholds'][0]:g}", "-" if a is None else f"{a['gated']:.2%}",
                          f"{p['flops']['reduction']:.1%}", f"{p['flops']['ideal_speedup']:.2f}x",
                          f"{p['speed']['speedup']:.2f}x", "/".join(f"{f:.2f}" for f in p["exits"]["fractions"]))
        console.print(sweep)


def bench_figure(report: dict[str, Any]) -> Figure:
    """Accuracy vs cost (the sweep, with the bundle's own thresholds marked) and speed-up per batch size."""
    import numpy as np

    fig = _figure((11, 4.2))
    ax, bars = fig.subplots(1, 2)
    if report["sweep"]:
        pts = report["sweep"]
        cost = [1 - p["flops"]["reduction"] for p in pts]
        if pts[0]["accuracy"]:
            ax.plot(cost, [100 * p["accuracy"]["gated"] for p in pts], "o-", label="same threshold at every gate")
            ax.set_ylabel("accuracy (%)")
        else:
            ax.plot(cost, [p["speed"]["speedup"] for p in pts], "o-", label="measured speed-up")
            ax.set_ylabel("measured speed-up")
    if report["accuracy"]:
        ax.plot([1 - report["flops"]["reduction"]], [100 * report["accuracy"]["gated"]], "r*", ms=14,
                label="bundle's thresholds")
        ax.axhline(100 * report["accuracy"]["baseline"], color="gray", ls="--", label="un-gated")
        ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("expected FLOPs / un-gated FLOPs")
    ax.set_title("accuracy vs cost")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    sizes = [str(s["batch_size"]) for s in report["speed"]]
    pos = np.arange(len(sizes))
    bars.bar(pos - 0.2, [s["speedup"] for s in report["speed"]], 0.4, label="measured")
    bars.bar(pos + 0.2, [s["ideal_speedup"] for s in report["speed"]], 0.4, label="ideal (FLOPs)")
    bars.set_xticks(pos, sizes)
    bars.set_xlabel("batch size")
    bars.set_ylabel("speed-up over un-gated")
    bars.set_title(f"{report['bundle']['name']} on {report['bundle']['backend']}")
    bars.legend()
    bars.grid(alpha=0.3, axis="y")
    return fig


def bench_plot(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """bench_figure as a PNG at `path` (bench --plot)."""
    return save_png(bench_figure(report), path, dpi=110)


# --- calibration -------------------------------------------------------------------------------------


def calibration_tables(result: Calibration, test: Evaluation | None, exits: Sequence[str], *,
                       console: Console | None = None) -> None:
    """Un-gated vs gated (validation, held out, test), the promise, then every exit's share and accuracy."""
    console = console_for(console)
    val = result.validation
    if result.mode == "budget":
        target = f"expected FLOPs <= {result.target:g} x un-gated on validation"
    elif result.guarantee is not None:
        target = f"accuracy drop <= {result.target:g} on new data, probability >= {1 - result.guarantee.delta:g}"
    else:
        target = f"accuracy drop <= {result.target:g} on validation"
    summary = table(("split", "un-gated", "gated", "drop", "FLOPs gated / un-gated", "saved", "ideal"),
                    f"Gating ({result.confidence}; thresholds for {target})", left=("split",))
    for name, ev in (("val", val), ("val, held out", result.held_out), ("test", test)):
        if ev is None:
            continue
        summary.add_row(name, f"{ev.accuracy_ungated:.2%}", f"{ev.accuracy:.2%}", f"{ev.accuracy_drop:+.2%}",
                        f"{si(ev.expected_flops)} / {si(ev.baseline_flops)}", f"{ev.flops_reduction:.1%}",
                        f"{ev.ideal_speedup:.2f}x")
    console.print(summary)
    console.print(result.promise())

    per_exit = table(("exit", "after", "threshold", "val share", "test share", "test acc"),
                     "Exits (share of samples leaving there; accuracy of those samples)", left=("after",))
    for k, name in enumerate([*exits, "backbone output"]):
        gate = k < len(result.thresholds)
        acc = test.exit_accuracy[k] if test is not None else None
        per_exit.add_row(
            str(k), name,
            ("disabled" if result.thresholds[k] >= NEVER_EXIT else f"{result.thresholds[k]:.4f}") if gate else "-",
            f"{val.exit_fractions[k]:.1%}",
            f"{test.exit_fractions[k]:.1%}" if test is not None else "-",
            f"{acc:.2%}" if acc is not None else "-",
        )
    console.print(per_exit)


def calibration_figure(result: Calibration, test: Evaluation | None = None) -> Figure:
    """The accuracy-vs-cost front on validation, the un-gated point, the chosen thresholds (and on test)."""
    val = result.validation
    fig = _figure((6.4, 4.4), dpi=120)
    ax = fig.add_subplot()
    xs = [p["relative_flops"] for p in result.curve]
    ys = [100 * p["accuracy"] for p in result.curve]
    ax.step(xs, ys, where="post", color="tab:blue", label="gated, validation (Pareto front)")
    ax.axhline(100 * val.accuracy_ungated, color="gray", ls="--", lw=1)
    ax.plot([1.0], [100 * val.accuracy_ungated], "D", color="gray", label="un-gated, validation")
    ax.plot([val.expected_flops / val.baseline_flops], [100 * val.accuracy], "o", color="tab:red",
            label=f"chosen ({result.mode}={result.target:g}), validation")
    if test is not None:
        ax.plot([test.expected_flops / test.baseline_flops], [100 * test.accuracy], "s", color="tab:green",
                label="chosen, test")
    ax.set_xlabel("expected FLOPs / un-gated FLOPs")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy vs cost ({result.confidence})")
    lo = min([*ys, 100 * val.accuracy])
    ax.set_ylim(max(lo - 1, 100 * val.accuracy_ungated - 15), 100 * val.accuracy_ungated + 2)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def calibration_plot(result: Calibration, path: str | os.PathLike, *, test: Evaluation | None = None) -> Path:
    """calibration_figure as a PNG at `path` (gate and calibrate write MODEL.curve.png)."""
    return save_png(calibration_figure(result, test), path)


# --- inspect -----------------------------------------------------------------------------------------


def bundle_tables(bundle_dir: str | os.PathLike, manifest: Manifest, checks: Iterable[FileCheck], *,
                  console: Console | None = None) -> None:
    """A bundle as tables (`dgate-export inspect engines/NAME`), each artifact with its sha256 check.
    The last line says that all artifacts match; with a damaged one it is left out (the caller raises)."""
    from .manifest import TensorSpec

    console = console_for(console)
    checked = {c.file: c for c in checks}
    inp = manifest.input
    norm = inp.normalization
    console.print(
        f"[bold]{_escape(str(bundle_dir))}[/]: bundle {_escape(repr(manifest.name))} ({manifest.format}), backend "
        f"{manifest.backend}, precision {manifest.precision}, max batch {manifest.max_batch}, opset {manifest.opset}, "
        f"created {manifest.created}"
    )
    console.print(
        f"input {_tensor_text(TensorSpec(inp.name, inp.shape, inp.dtype))} {inp.layout}; normalization "
        + (f"x = (raw * {norm['scale']:.6g} - mean) / std, mean {norm['mean']}, std {norm['std']}" if norm else "none")
    )
    if manifest.quantization is not None:
        console.print(quantization_text(manifest.quantization), markup=False)
    names = ", ".join(manifest.class_names) if manifest.class_names else "unnamed"
    console.print(f"{manifest.num_classes} classes ({names}); confidence {manifest.confidence}", markup=False)

    segments = table(("seg", "exit", "threshold", "FLOPs", "head FLOPs", "cost if exiting", "file", "sha256"),
                     "segments (FLOPs per sample, 2 x MACs)", left=("exit", "cost if exiting", "file", "sha256"))
    baseline_flops = manifest.baseline.flops
    cost: int | None = 0
    for seg in manifest.segments:
        gate = seg.gate
        if cost is not None and seg.flops is not None and (gate is None or gate.head_flops is not None):
            cost += seg.flops + (gate.head_flops or 0 if gate else 0)
        else:
            cost = None
        share = f" ({cost / baseline_flops:.0%})" if baseline_flops and cost is not None else ""
        segments.add_row(
            str(seg.index), gate.exit if gate else "(output)", f"{gate.threshold:.4f}" if gate else "-",
            si(seg.flops), si(gate.head_flops) if gate else "-",
            f"{si(cost)}{share}" if cost is not None else "?",
            _files_text(seg.file, seg.engine["file"]), _status_text(checked, seg.file, seg.engine["file"]),
        )
    b = manifest.baseline
    segments.add_row("base", "(un-gated)", "-", si(b.flops), "-", f"{si(b.flops)} (100%)" if b.flops else "?",
                     _files_text(b.file, b.engine["file"]), _status_text(checked, b.file, b.engine["file"]))
    console.print(segments)
    if manifest.calibration:
        cal = manifest.calibration
        console.print(f"thresholds fitted to this bundle's confidences ({cal.get('created')}, on "
                      f"{(cal.get('on') or {}).get('precision')}): {cal.get('promise')}", markup=False)

    tensors = table(("seg", "inputs", "outputs"), "tensors (batch, rows: dynamic 1..max batch)",
                    left=("inputs", "outputs"))
    for seg in manifest.segments:
        tensors.add_row(str(seg.index), "\n".join(_tensor_text(t) for t in seg.inputs),
                        "\n".join(_tensor_text(t) for t in seg.outputs))
    tensors.add_row("base", "\n".join(_tensor_text(t) for t in b.inputs),
                    "\n".join(_tensor_text(t) for t in b.outputs))
    console.print(tensors)
    tools = ", ".join(f"{k} {v}" for k, v in manifest.tools.items())
    console.print(f"tools: {tools}", markup=False)
    if manifest.backend_info:
        import json

        console.print(f"backend info: {json.dumps(manifest.backend_info)}", markup=False)
    if all(c.status == "ok" for c in checked.values()):
        console.print(f"all {len(checked)} artifacts match their sha256")


def quantization_text(q: dict[str, Any]) -> str:
    """One line on how an int8 bundle was quantized (the manifest's "quantization" entry)."""
    cal = q.get("calibration") or {}
    src = cal.get("source") or {}
    thr = q.get("thresholds") or {}
    return (f"int8: {q.get('method', '?')}; weights {q.get('weights', '?')}, activations {q.get('activations', '?')}; "
            f"calibrated on {cal.get('rows', '?')} rows of {src.get('data', '?')} ({src.get('split', '?')} split); "
            f"thresholds fitted on {thr.get('fitted_on', '?')}")


def checkpoint_tables(summary: CheckpointSummary, *, console: Console | None = None) -> None:
    """A gated checkpoint as tables (`dgate-export inspect model.pt`)."""
    console = console_for(console)
    arch = summary.arch
    console.print(f"[bold]{_escape(summary.path)}[/]: {_escape(arch['name'])} {_escape(str(arch['kwargs'] or ''))}, "
                  f"input {_escape(str(summary.input_shape))}, {summary.num_classes} classes, "
                  f"confidence {summary.confidence}, head {summary.head}, feature layouts "
                  f"{', '.join(summary.feature_layouts)}")
    segments = table(("segment", "ends at", "params", "FLOPs", "head FLOPs", "threshold", "cost if exiting here"),
                     "segments (FLOPs per sample, 2 x MACs)", left=("ends at",))
    for k, seg in enumerate(summary.segments):
        segments.add_row(
            str(k), seg.ends_at, f"{seg.params:,}", f"{seg.flops:,}",
            f"{seg.head_flops:,}" if seg.head_flops is not None else "-",
            f"{seg.threshold:.4f}" if seg.threshold is not None else "-",
            f"{seg.cost:,.0f} ({seg.cost / summary.baseline_flops:.0%})",
        )
    console.print(segments)
    console.print(f"baseline (un-gated) FLOPs per sample: {summary.baseline_flops:,}")
    split = summary.data_split
    console.print(f"validation split (gates trained without it; calibrate uses it): {split['val_size']} rows "
                  f"of {split['data']}, seed {split['seed']}" if split else
                  "validation split: not recorded (an older checkpoint; give calibrate the --val-size and --seed gate had)",
                  markup=False)


def _escape(text: str) -> str:
    from rich.markup import escape  # "[batch, 3]" or a path with brackets would read as markup

    return escape(text)


def _files_text(graph: str, engine: str) -> str:
    return graph if graph == engine else f"{graph}\n{engine}"


def _tensor_text(t: TensorSpec) -> str:
    return _escape(f"{t.name} {t.dtype} [{', '.join(str(d) for d in t.shape)}]")


def _status_text(checks: dict[str, FileCheck], *files: str) -> str:
    statuses = {checks[f].status for f in files}
    if statuses == {"ok"}:
        return "[green]ok[/]"
    return "[red]" + "/".join(sorted(statuses - {"ok"})) + "[/]"
