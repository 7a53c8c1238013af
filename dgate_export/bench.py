"""Measure a bundle against its un-gated baseline on the same backend (no torch).

Accuracy and exits come from one pass over the data, read in batches (data.Rows: memory does not grow
with the rows). Speed is measured per batch size with the gated runtime and the baseline interleaved
call by call (the order alternating each iteration), so drift of the machine hits both alike, on the
first rows of the data (as many as `timing_bytes` of model input hold, at least two of the largest
batches). The
ideal speed-up of the timed batches is computed from the exits those very batches took, so efficiency
= measured / ideal compares like with like.

The JSON written by `--json` follows `docs/bench.md` (schema "dgate-bench/1").
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .contract import INPUT, LOGITS, NEVER_EXIT, exit_at, expected_cost
from .data import check_labels
from .errors import UserError
from .files import write_text_atomic
from .runtime import GatedRuntime

SCHEMA = "dgate-bench/1"
LATENCY_KEYS = ("mean", "median", "p90", "p95", "p99", "min", "max")  # trtexec's names
SWEEP_THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, NEVER_EXIT)
TIMING_BYTES = 256 << 20  # model input kept in memory for the timed batches (all rows when they fit)
PASS_BATCH = 256  # rows read at a time for the accuracy pass


@dataclass
class BenchOptions:
    batch_sizes: Sequence[int] = (1, 32, 256)
    warmup_ms: float = 200.0
    min_iterations: int = 10
    min_seconds: float = 3.0
    thresholds: Sequence[float] | None = None
    sweep: bool = False
    sweep_seconds: float = 1.0  # timing per sweep point (at the largest batch size)
    exit_times: bool = False    # also time leaving at each exit: the time-based ideal speed-up
    timing_bytes: int = TIMING_BYTES  # model input kept in memory for the timed batches


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    pct = np.percentile(ms, [50, 90, 95, 99])
    return {"mean": float(ms.mean()), "median": float(pct[0]), "p90": float(pct[1]), "p95": float(pct[2]),
            "p99": float(pct[3]), "min": float(ms.min()), "max": float(ms.max())}


def _baseline_logits(baseline, x: np.ndarray, max_batch: int) -> np.ndarray:
    return np.concatenate([baseline.run({INPUT: x[i:i + max_batch]})[LOGITS]
                           for i in range(0, len(x), max_batch)]).astype(np.float32)


def as_rows(x: Any, y: np.ndarray | None = None, normalization: dict | None = None) -> Any:
    """data.Rows as they are, or arrays (x, y) as rows (uint8 x normalized with `normalization`)."""
    if hasattr(x, "batches"):
        return x
    from .data import ArrayRows

    x = np.asarray(x)
    return ArrayRows(x, None if y is None else np.asarray(y), normalization=normalization if x.dtype == np.uint8 else None)


def _one_pass(rt: GatedRuntime, baseline, rows: Any, thresholds: Sequence[float] | None,
              with_baseline: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(predictions, exits, labels or None, baseline predictions or None) of every row, read in batches."""
    preds, exits, labels, base = [], [], [], []
    for xb, yb in rows.batches(min(PASS_BATCH, rt.max_batch)):
        xb = rt._prepare(xb)
        res = rt.run(xb, thresholds=thresholds)
        preds.append(res.predictions)
        exits.append(res.exits)
        if yb is not None:
            labels.append(np.asarray(yb))
        if with_baseline:
            base.append(_baseline_logits(baseline, xb, rt.max_batch).argmax(axis=1))
    y = np.concatenate(labels) if labels and len(labels) == len(preds) else None
    return (np.concatenate(preds), np.concatenate(exits), y, np.concatenate(base) if with_baseline else None)


def quality(rt: GatedRuntime, baseline, x: Any, y: np.ndarray | None, costs: list[float],
            baseline_flops: float, thresholds: Sequence[float] | None = None,
            baseline_pred: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy (when labels are given), exit fractions and expected FLOPs of one pass over x (arrays with
    labels y, or data.Rows read in batches)."""
    rows = as_rows(x, y, rt.manifest.input.normalization)
    labelled = rows.labels() is not None
    predictions, taken, labels, base_pred = _one_pass(rt, baseline, rows, thresholds,
                                                      with_baseline=labelled and baseline_pred is None)
    counts = np.bincount(taken, minlength=rt.num_gates + 1).astype(int)
    fractions = counts / counts.sum()
    expected = expected_cost(costs, fractions)
    out: dict[str, Any] = {
        "thresholds": [float(t) for t in (thresholds if thresholds is not None else rt.thresholds)],
        "exits": {"counts": counts.tolist(), "fractions": fractions.tolist()},
        "flops": {"baseline": baseline_flops, "expected": expected, "reduction": 1.0 - expected / baseline_flops,
                  "ideal_speedup": baseline_flops / expected, "exit_costs": costs},
        "accuracy": None,
    }
    if labels is not None:
        if baseline_pred is None:
            baseline_pred = base_pred
        assert baseline_pred is not None  # computed in the pass when not given
        correct: np.ndarray = np.equal(predictions, labels)
        per_exit = [float(correct[taken == k].mean()) if counts[k] else None for k in range(len(counts))]
        gated, base = float(correct.mean()), float(np.mean(np.equal(baseline_pred, labels)))
        out["accuracy"] = {"gated": gated, "baseline": base, "drop_points": 100.0 * (base - gated),
                           "per_exit": per_exit}
    return out


def baseline_predictions(rt: GatedRuntime, baseline, rows: Any) -> np.ndarray:
    """The un-gated model's prediction for every row, read in batches."""
    out = []
    for xb, _ in rows.batches(min(PASS_BATCH, rt.max_batch)):
        out.append(_baseline_logits(baseline, rt._prepare(xb), rt.max_batch).argmax(axis=1))
    return np.concatenate(out)


def timing_rows(rows: Any, batch_sizes: Sequence[int], limit: int = TIMING_BYTES) -> np.ndarray:
    """The first rows of `rows` that the timing runs on: all of them when their model input fits in
    `limit` bytes, else as many as fit (at least twice the largest batch size)."""
    per_row = 4 * int(np.prod(rows.sample_shape))
    n = min(len(rows), max(2 * max(batch_sizes), limit // max(per_row, 1)))
    parts = [xb for xb, _ in rows.batches(min(PASS_BATCH, n), np.arange(n))]
    return np.concatenate(parts)


def exit_time_costs(rt: GatedRuntime, baseline, x: np.ndarray, batch_size: int, costs: list[float],
                    baseline_flops: float, *, warmup_ms: float, min_seconds: float) -> list[float]:
    """Measured time of leaving at exit k, relative to the un-gated model, for k = 0..K at this batch size:
    every sample leaves at exit k (segments 0..k and gates 0..k run), timed interleaved with the baseline.
    The time-based counterpart of the FLOPs costs: where FLOPs are not time (small early layers run
    fewer FLOP/s) the FLOPs ideal cannot be reached, whatever the runtime does."""
    rel = []
    for k in range(rt.num_gates + 1):
        thr = exit_at(k, rt.num_gates)
        t = time_batches(rt, baseline, x, batch_size, costs, baseline_flops, warmup_ms=warmup_ms,
                         min_iterations=3, min_seconds=min_seconds, thresholds=thr)
        rel.append(1.0 / t["speedup"])
    return rel


def time_batches(rt: GatedRuntime, baseline, x: np.ndarray, batch_size: int, costs: list[float],
                 baseline_flops: float, *, warmup_ms: float, min_iterations: int, min_seconds: float,
                 thresholds: Sequence[float] | None = None,
                 tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Interleaved timing of gated and baseline runs on consecutive batches of x."""
    n_batches = max(1, len(x) // batch_size)
    batches = [x[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
    if len(batches[0]) < batch_size:  # fewer samples than one batch: tile them
        reps = -(-batch_size // len(x))
        batches = [np.concatenate([x] * reps)[:batch_size]]
    feeds = [{INPUT: b} for b in batches]
    gated_t: list[float] = []
    base_t: list[float] = []
    counts = np.zeros(len(costs), dtype=np.int64)

    def one(i: int, record: bool) -> None:
        b = i % len(batches)
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                res = rt.run(batches[b], thresholds=thresholds)
            else:
                baseline.run(feeds[b])
            dt = time.perf_counter() - t0
            if record:
                (gated_t if which == 0 else base_t).append(dt)
                if which == 0:
                    counts[:] += res.exit_counts

    start = time.perf_counter()
    i = 0
    while (time.perf_counter() - start) * 1e3 < warmup_ms or i < 2:
        one(i, record=False)
        i += 1
    start = time.perf_counter()
    while len(gated_t) < min_iterations or time.perf_counter() - start < min_seconds:
        one(i, record=True)
        i += 1
        if tick:
            tick()
    fractions = counts / counts.sum()
    ideal = baseline_flops / expected_cost(costs, fractions)
    gated, base = latency_stats(gated_t), latency_stats(base_t)
    speedup = base["mean"] / gated["mean"]
    return {
        "batch_size": batch_size,
        "iterations": len(gated_t),
        "gated": {"latency_ms": gated, "throughput": batch_size / (gated["mean"] / 1e3)},
        "baseline": {"latency_ms": base, "throughput": batch_size / (base["mean"] / 1e3)},
        "speedup": speedup,
        "ideal_speedup": ideal,
        "efficiency": speedup / ideal,
        "exit_fractions": fractions.tolist(),
    }


def run_bench(bundle: str | Path, x: Any, y: np.ndarray | None, options: BenchOptions, *,
              data_info: dict[str, Any], backend: str | None = None, command: str | None = None,
              progress: bool = True, runner_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole report as a dict (see docs/bench.md). `x`: data.Rows (read in batches; `y` unused), or
    arrays x [N, C, H, W] and labels y (or None). `runner_options` go to both sides' runners."""
    from tqdm import tqdm

    runner_options = runner_options or {}
    rt = GatedRuntime.load(bundle, backend=backend, thresholds=options.thresholds, **runner_options)
    baseline = rt.baseline_runner()
    manifest = rt.manifest
    rows = as_rows(x, y, manifest.input.normalization)
    too_big = [b for b in options.batch_sizes if b > manifest.max_batch]
    if too_big or any(b < 1 for b in options.batch_sizes):
        raise UserError(f"Batch sizes {list(options.batch_sizes)} include values outside 1..{manifest.max_batch}, "
                        "the range this bundle was built for.",
                        f"Use batch sizes up to {manifest.max_batch}, or rebuild with a larger --max-batch.")
    labels = rows.labels()
    check_labels(labels, manifest.num_classes)
    rt.warmup()  # one-time per-shape costs (GPU providers) stay out of the timings
    costs = manifest.exit_costs()
    base_flops = float(manifest.baseline.flops or costs[-1])
    baseline_pred = baseline_predictions(rt, baseline, rows) if labels is not None else None
    timed = rt._prepare(timing_rows(rows, options.batch_sizes, options.timing_bytes))  # the bundle's float type (fp16) for both sides
    data_info = dict(data_info, timing_rows=len(timed))
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "bundle": {"path": str(bundle), "name": manifest.name, "backend": backend or manifest.backend,
                   "precision": manifest.precision, "max_batch": manifest.max_batch, "num_gates": rt.num_gates,
                   "confidence": manifest.confidence,
                   # ONNX Runtime: the execution providers the sessions really got (cpu unless asked)
                   "providers": getattr(baseline, "providers", None)},
        "versions": _versions(backend or manifest.backend),
        "data": data_info,
        **quality(rt, baseline, rows, None, costs, base_flops, baseline_pred=baseline_pred),
        "speed": [],
        "sweep": None,
    }
    total = len(options.batch_sizes) + (len(SWEEP_THRESHOLDS) if options.sweep else 0)
    with tqdm(total=total, desc="timing", unit="setting", disable=not progress, leave=False) as bar:
        for b in options.batch_sizes:
            bar.set_postfix_str(f"batch {b}")
            entry = time_batches(rt, baseline, timed, b, costs, base_flops, warmup_ms=options.warmup_ms,
                                 min_iterations=options.min_iterations, min_seconds=options.min_seconds)
            if options.exit_times:
                rel = exit_time_costs(rt, baseline, timed, b, costs, base_flops, warmup_ms=options.warmup_ms / 4,
                                      min_seconds=options.min_seconds / 2)
                entry["exit_time_costs"] = rel
                entry["time_ideal_speedup"] = 1.0 / expected_cost(rel, entry["exit_fractions"])
                entry["runtime_efficiency"] = entry["speedup"] / entry["time_ideal_speedup"]
            report["speed"].append(entry)
            bar.update()
        if options.sweep:
            report["sweep"] = []
            b = max(options.batch_sizes)
            for t in SWEEP_THRESHOLDS:
                bar.set_postfix_str(f"sweep t={t}")
                thr = [t] * rt.num_gates
                point = quality(rt, baseline, rows, None, costs, base_flops, thresholds=thr,
                                baseline_pred=baseline_pred)
                timing = time_batches(rt, baseline, timed, b, costs, base_flops, warmup_ms=options.warmup_ms / 4,
                                      min_iterations=3, min_seconds=options.sweep_seconds, thresholds=thr)
                point["speed"] = {k: timing[k] for k in ("batch_size", "speedup", "ideal_speedup", "efficiency")}
                report["sweep"].append(point)
                bar.update()
    rt.close()
    return report


def _versions(backend: str) -> dict[str, str]:
    """Versions of what ran. The backend's from the imported module, not the installed metadata: with
    onnxruntime-gpu on a path before an installed onnxruntime, the metadata names the wrong one."""
    import importlib

    out = {"dgate_export": __version__, "numpy": np.__version__}
    if backend in ("onnxruntime", "tensorrt"):
        try:
            out[backend] = str(importlib.import_module(backend).__version__)
        except (ImportError, AttributeError):
            pass
    return out


def check_report(report: dict[str, Any]) -> None:
    """Assert the figures agree with each other (used by tests and after writing JSON)."""
    assert report["schema"] == SCHEMA
    fr = report["exits"]["fractions"]
    assert abs(sum(fr) - 1.0) < 1e-9
    flops = report["flops"]
    assert abs(flops["ideal_speedup"] - flops["baseline"] / flops["expected"]) < 1e-9 * flops["ideal_speedup"]
    if report["accuracy"] is not None:
        acc = report["accuracy"]
        assert 0.0 <= acc["gated"] <= 1.0 and 0.0 <= acc["baseline"] <= 1.0
        assert abs(acc["drop_points"] - 100.0 * (acc["baseline"] - acc["gated"])) < 1e-9
    for s in report["speed"]:
        assert abs(s["efficiency"] - s["speedup"] / s["ideal_speedup"]) < 1e-9
        if "time_ideal_speedup" in s:
            assert len(s["exit_time_costs"]) == len(fr) and min(s["exit_time_costs"]) > 0
            assert abs(s["time_ideal_speedup"] * float(np.dot(s["exit_fractions"], s["exit_time_costs"])) - 1) < 1e-9
            assert abs(s["runtime_efficiency"] - s["speedup"] / s["time_ideal_speedup"]) < 1e-9
        assert abs(s["speedup"] - s["baseline"]["latency_ms"]["mean"] / s["gated"]["latency_ms"]["mean"]) < 1e-9
        for side in ("gated", "baseline"):
            lat = s[side]["latency_ms"]
            assert set(lat) == set(LATENCY_KEYS)
            assert lat["min"] <= lat["median"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    return write_text_atomic(path, json.dumps(report, indent=2) + "\n")
