"""render.py: every table shows each figure under its own column, every plot draws the report's points.

Tables are printed to a recording rich Console and read back cell by cell; plots are checked on the
matplotlib Figure (the plotted coordinates) and as the PNG written to disk (its pixel size)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import pytest
from rich.console import Console
from test_manifest import _sample

from dgate_export import render
from dgate_export.calibrate import Calibration, Evaluation
from dgate_export.contract import NEVER_EXIT
from dgate_export.errors import UserError
from dgate_export.manifest import FileCheck, Manifest, check_files

LATENCY = {"mean": 1.5, "median": 1.4, "p90": 2.0, "p95": 2.5, "p99": 12.34, "min": 1.0, "max": 20.0}


def shown(draw, *args, **kwargs) -> str:
    """What `draw` prints, as plain text on a 200-column console."""
    console = Console(record=True, width=200, file=io.StringIO(), color_system=None)
    draw(*args, console=console, **kwargs)
    return console.export_text()


def rows(text: str, title: str) -> list[dict[str, str]]:
    """The rows of the table titled `title` (column -> cell; a cell over several lines joined by \\n)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    head = next(i for i in range(start, len(lines)) if "┃" in lines[i])
    columns = [c.strip() for c in lines[head].strip().strip("┃").split("┃")]
    out: list[dict[str, str]] = []
    for line in lines[head + 1:]:
        if line.lstrip().startswith("└"):
            break
        if "│" not in line or line.lstrip().startswith("├"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] or not out:
            out.append(dict(zip(columns, cells)))
        else:  # the next line of a multi-line row
            for col, cell in zip(columns, cells):
                if cell:
                    out[-1][col] += "\n" + cell
    return out


def bench_report(*, timed: bool = False) -> dict:
    speed = []
    for b, (measured, ideal) in ((1, (1.2, 2.5)), (8, (2.0, 2.5))):
        s = {"batch_size": b, "iterations": 100 * b, "speedup": measured, "ideal_speedup": ideal,
             "efficiency": measured / ideal,
             "gated": {"latency_ms": LATENCY, "throughput": 5000.0 * b},
             "baseline": {"latency_ms": {k: 2 * v for k, v in LATENCY.items()}, "throughput": 2500.0 * b}}
        if timed:
            s.update(time_ideal_speedup=2.2, runtime_efficiency=measured / 2.2, exit_time_costs=[0.3, 0.6, 1.1])
        speed.append(s)
    sweep = [{"thresholds": [t, t], "accuracy": {"gated": acc}, "flops": {"reduction": red, "ideal_speedup": 1 / (1 - red)},
              "speed": {"batch_size": 8, "speedup": sp}, "exits": {"fractions": fr}}
             for t, acc, red, sp, fr in ((0.5, 0.80, 0.6, 2.1, [0.7, 0.2, 0.1]), (0.9, 0.91, 0.3, 1.3, [0.3, 0.3, 0.4]))]
    return {
        "bundle": {"name": "demo", "backend": "onnxruntime", "precision": "fp32", "num_gates": 2,
                   "confidence": "max-softmax", "providers": ["CPUExecutionProvider"]},
        "data": {"description": "fashion-mnist test split (100 samples)"},
        "thresholds": [0.812345, 0.7],
        "accuracy": {"gated": 0.9, "baseline": 0.91, "drop_points": 1.0, "per_exit": [0.98, None, 0.75]},
        "flops": {"expected": 2.5e6, "baseline": 6.25e6, "reduction": 0.6, "ideal_speedup": 2.5,
                  "exit_costs": [1.0e6, 3.0e6, 6.5e6]},
        "exits": {"fractions": [0.5, 0.0, 0.5]},
        "speed": speed,
        "sweep": sweep,
    }


def test_bench_tables_put_each_figure_in_its_column():
    text = shown(render.bench_tables, bench_report())
    assert "demo (onnxruntime, fp32, 2 gates, max-softmax) on fashion-mnist test split (100 samples)" in text
    assert "thresholds [0.8123, 0.7]" in text and "execution providers CPUExecutionProvider" in text
    assert "│ accuracy drop" in text and "1.00 points" in text
    assert "│ FLOPs per sample gated / baseline │ 2.50 M / 6.25 M │" in text
    assert rows(text, "exits") == [
        {"exit": "gate 0", "fraction": "50.0%", "accuracy": "98.00%", "cost (FLOPs)": "1.00 M"},
        {"exit": "gate 1", "fraction": "0.0%", "accuracy": "-", "cost (FLOPs)": "3.00 M"},
        {"exit": "final", "fraction": "50.0%", "accuracy": "75.00%", "cost (FLOPs)": "6.50 M"}]
    latency = rows(text, "latency per batch (ms), gated and baseline timed call by call in alternation")
    assert latency[2] == {"batch": "8", "side": "gated", "mean": "1.500", "median": "1.400", "p90": "2.000",
                          "p95": "2.500", "p99": "12.3", "min": "1.000", "max": "20.0", "samples/s": "40,000"}
    assert [(r["side"], r["p99"], r["samples/s"]) for r in latency[:2]] == [("gated", "12.3", "5,000"),
                                                                              ("baseline", "24.7", "2,500")]
    assert rows(text, "speed-up over the un-gated baseline") == [
        {"batch": "1", "iterations": "100", "measured": "1.20x", "ideal (FLOPs)": "2.50x", "efficiency": "48%"},
        {"batch": "8", "iterations": "800", "measured": "2.00x", "ideal (FLOPs)": "2.50x", "efficiency": "80%"}]
    sweep = rows(text, "threshold sweep (same threshold at every gate; timing at batch 8)")
    assert sweep[1] == {"threshold": "0.9", "accuracy": "91.00%", "FLOPs reduction": "30.0%", "ideal": "1.43x",
                        "measured": "1.30x", "exit fractions": "0.30/0.30/0.40"}


def test_bench_tables_with_exit_times_and_without_labels():
    report = bench_report(timed=True)
    report["accuracy"] = None
    report["sweep"] = []
    text = shown(render.bench_tables, report)
    speed = rows(text, "speed-up over the un-gated baseline")
    assert speed[1]["ideal (time)"] == "2.20x" and speed[1]["runtime efficiency"] == "91%"
    assert speed[1]["time of leaving at exit k / un-gated"] == "0.30 / 0.60 / 1.10"
    assert [r["accuracy"] for r in rows(text, "exits")] == ["-", "-", "-"]
    assert "accuracy drop" not in text and "threshold sweep" not in text


def evaluation(accuracy: float, fractions: list[float], exit_accuracy: list[float | None]) -> Evaluation:
    return Evaluation(thresholds=[0.9, NEVER_EXIT], accuracy=accuracy, accuracy_ungated=0.92,
                      exit_fractions=fractions, exit_accuracy=exit_accuracy, expected_flops=2.5e6,
                      baseline_flops=5e6, samples=1000)


def calibration() -> tuple[Calibration, Evaluation]:
    val = evaluation(0.9, [0.6, 0.0, 0.4], [0.95, None, 0.85])
    curve = [{"thresholds": [0.5, 0.5], "accuracy": 0.85, "flops": 1.5e6, "relative_flops": 0.3},
             {"thresholds": [0.9, NEVER_EXIT], "accuracy": 0.9, "flops": 2.5e6, "relative_flops": 0.5}]
    result = Calibration("max_drop", 0.02, "max-softmax", [0.9, NEVER_EXIT], val, curve, method="grid")
    return result, evaluation(0.885, [0.55, 0.0, 0.45], [0.97, None, 0.8])


def test_calibration_tables_put_each_figure_in_its_column():
    result, test = calibration()
    text = shown(render.calibration_tables, result, test, ["layer1", "layer2"])
    summary = rows(text, "Gating (max-softmax; thresholds for accuracy drop <= 0.02 on validation)")
    assert summary == [
        {"split": "val", "un-gated": "92.00%", "gated": "90.00%", "drop": "+2.00%",
         "FLOPs gated / un-gated": "2.5M / 5M", "saved": "50.0%", "ideal": "2.00x"},
        {"split": "test", "un-gated": "92.00%", "gated": "88.50%", "drop": "+3.50%",
         "FLOPs gated / un-gated": "2.5M / 5M", "saved": "50.0%", "ideal": "2.00x"}]
    assert "The accuracy drop is held to 2 point(s) on the 1000 validation rows" in text
    exits = rows(text, "Exits (share of samples leaving there; accuracy of those samples)")
    assert exits == [
        {"exit": "0", "after": "layer1", "threshold": "0.9000", "val share": "60.0%", "test share": "55.0%",
         "test acc": "97.00%"},
        {"exit": "1", "after": "layer2", "threshold": "disabled", "val share": "0.0%", "test share": "0.0%",
         "test acc": "-"},
        {"exit": "2", "after": "backbone output", "threshold": "-", "val share": "40.0%", "test share": "45.0%",
         "test acc": "80.00%"}]
    alone = rows(shown(render.calibration_tables, result, None, ["layer1", "layer2"]),
                 "Exits (share of samples leaving there; accuracy of those samples)")
    assert [(r["test share"], r["test acc"]) for r in alone] == [("-", "-")] * 3


def test_bundle_tables_show_segments_costs_files_and_checks(tmp_path):
    manifest = Manifest.from_dict(_sample(tmp_path))
    checks = check_files(manifest, tmp_path)
    text = shown(render.bundle_tables, tmp_path, manifest, checks)
    assert f"{tmp_path}: bundle 'demo' (dgate-bundle/1), backend onnxruntime, precision fp32" in text
    assert "input input float32 [batch, 1, 8, 8] NCHW; normalization x = (raw * 0.00392157 - mean) / std" in text
    segments = rows(text, "segments (FLOPs per sample, 2 x MACs)")
    assert segments[1] == {"seg": "1", "exit": "layer2", "threshold": "0.8000", "FLOPs": "2k", "head FLOPs": "48",
                           "cost if exiting": "3.07k (51%)", "file": "segment1.onnx", "sha256": "ok"}
    assert segments[2]["exit"] == "(output)" and segments[2]["cost if exiting"] == "6.07k (101%)"
    assert segments[3] == {"seg": "base", "exit": "(un-gated)", "threshold": "-", "FLOPs": "6k", "head FLOPs": "-",
                           "cost if exiting": "6k (100%)", "file": "baseline.onnx", "sha256": "ok"}
    tensors = rows(text, "tensors (batch, rows: dynamic 1..max batch)")
    assert tensors[1]["inputs"] == "prev_carry_0 float32 [rows, 4, 8, 8]\nindex int64 [batch]"
    assert text.rstrip().endswith("all 4 artifacts match their sha256")

    bad = [FileCheck(c.file, c.expected, "mismatch" if c.file == "segment2.onnx" else c.status) for c in checks]
    damaged = shown(render.bundle_tables, tmp_path, manifest, bad)
    assert [r["sha256"] for r in rows(damaged, "segments (FLOPs per sample, 2 x MACs)")] == [
        "ok", "ok", "mismatch", "ok"]
    assert "artifacts match" not in damaged


def test_checkpoint_tables():
    from dgate_export.compile.checkpoint import CheckpointSummary, SegmentSummary

    summary = CheckpointSummary(
        "runs/model.pt", {"name": "resnet20", "kwargs": {"num_classes": 10}}, [1, 28, 28], 10, "margin", "mlp",
        ["nchw", "nchw"],
        [SegmentSummary("layer1", 12345, 2_000_000, 40_000, 0.8, 2_040_000),
         SegmentSummary("output", 500, 3_000_000, None, None, 5_040_000)],
        5_000_000, {"data": "fashion-mnist", "val_size": 5000, "seed": 0})
    text = shown(render.checkpoint_tables, summary)
    assert "runs/model.pt: resnet20 {'num_classes': 10}, input [1, 28, 28], 10 classes, confidence margin, head mlp" in text
    assert rows(text, "segments (FLOPs per sample, 2 x MACs)") == [
        {"segment": "0", "ends at": "layer1", "params": "12,345", "FLOPs": "2,000,000", "head FLOPs": "40,000",
         "threshold": "0.8000", "cost if exiting here": "2,040,000 (41%)"},
        {"segment": "1", "ends at": "output", "params": "500", "FLOPs": "3,000,000", "head FLOPs": "-",
         "threshold": "-", "cost if exiting here": "5,040,000 (101%)"}]
    assert "baseline (un-gated) FLOPs per sample: 5,000,000" in text
    assert "5000 rows of fashion-mnist, seed 0" in text


@pytest.mark.parametrize(("value", "text"), [(None, "?"), (37, "37"), (0.5, "0.5"), (999, "999"), (1000, "1k"),
                                             (512_000, "512k"), (21_900_000, "21.9M"), (3.2e9, "3.2G")])
def test_si(value, text):
    assert render.si(value) == text


def test_ms():
    assert [render.ms(v) for v in (0.12345, 9.9994, 10.0, 123.45)] == ["0.123", "9.999", "10.0", "123.5"]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_bench_plot_draws_the_report(tmp_path):
    report = bench_report()
    fig = render.bench_figure(report)
    cost_ax, speed_ax = fig.axes
    star = next(line for line in cost_ax.get_lines() if line.get_label() == "bundle's thresholds")
    assert list(star.get_xdata()) == pytest.approx([0.4]) and list(star.get_ydata()) == pytest.approx([90.0])
    sweep = next(line for line in cost_ax.get_lines() if line.get_label() == "same threshold at every gate")
    assert list(sweep.get_xdata()) == pytest.approx([0.4, 0.7]) and list(sweep.get_ydata()) == pytest.approx([80, 91])
    measured, ideal = speed_ax.containers
    assert [b.get_height() for b in measured] == [1.2, 2.0] and [b.get_height() for b in ideal] == [2.5, 2.5]
    assert [t.get_text() for t in speed_ax.get_xticklabels()] == ["1", "8"]
    path = render.bench_plot(report, tmp_path / "bench.png")
    assert png_size(path) == (1210, 462)  # 11 x 4.2 inches at 110 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # no temp file left


def test_calibration_plot_draws_the_front_and_the_choice(tmp_path):
    result, test = calibration()
    (ax,) = render.calibration_figure(result, test).axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    front = lines["gated, validation (Pareto front)"]
    assert list(front.get_xdata()) == [0.3, 0.5] and list(front.get_ydata()) == pytest.approx([85, 90])
    assert list(lines["chosen (max_drop=0.02), validation"].get_ydata()) == pytest.approx([90])
    assert list(lines["chosen, test"].get_ydata()) == pytest.approx([88.5])
    assert list(lines["un-gated, validation"].get_xydata()[0]) == pytest.approx([1.0, 92.0])
    path = render.calibration_plot(result, tmp_path / "m.curve.png")
    assert png_size(path) == (768, 528)  # 6.4 x 4.4 inches at 120 dpi


def test_importing_render_loads_neither_rich_nor_matplotlib():
    code = ("import sys, dgate_export.render; "
            "assert not {'rich', 'matplotlib', 'numpy'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_plot_without_matplotlib_names_the_plot_extra(tmp_path, monkeypatch):
    """The plain install has no matplotlib: a plot asked for is a UserError naming the [plot] extra, and
    no file is left; tables need no matplotlib."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(UserError, match="needs matplotlib") as err:
        render.bench_plot(bench_report(), tmp_path / "bench.png")
    assert err.value.hint == "Install it: pip install 'dgate-export[plot]'."
    result, test = calibration()
    with pytest.raises(UserError, match="needs matplotlib"):
        render.calibration_plot(result, tmp_path / "m.curve.png", test=test)
    with pytest.raises(UserError, match=r"dgate-export\[plot\]"):
        render.require_matplotlib()
    assert list(tmp_path.iterdir()) == []
    assert "accuracy drop" in shown(render.bench_tables, bench_report())
