"""`calibrate --engine BUNDLE`: fit the thresholds to the bundle's own confidences (no torch).

An fp16 (later int8) bundle, or another backend, computes confidences that differ from the torch
model's in the last bits or more; the thresholds that keep a promise are the ones fitted to what runs.
`exit_scores` runs the bundle's segments with `GatedRuntime` on labelled rows, once per exit with every
sample sent out there (the gates forced), and keeps each gate's confidence as the runtime computed it
and each exit's correctness. `recalibrate` chooses thresholds on the validation rows with
`calibrate.calibrate_scores` (the same promise and options as for a checkpoint), then rewrites only the
gates' thresholds and a `calibration` record in manifest.json, atomically (`write_manifest`: validated,
temp file, rename). The artifacts are untouched, so every sha256 the manifest lists still holds; the
bundle is verified before and after.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .contract import exit_at
from .errors import UserError


def exit_scores(rt, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(conf [K, N] float32, correct [K+1, N] bool) of every exit of the runtime's bundle on x, y."""
    k_gates = rt.num_gates
    conf = np.empty((k_gates, len(x)), dtype=np.float32)
    correct = np.empty((k_gates + 1, len(x)), dtype=bool)
    for k in range(k_gates + 1):
        res = rt.run(x, thresholds=exit_at(k, k_gates))
        if not (res.exits == k).all():
            raise RuntimeError(f"forcing exit {k} sent samples to exits {np.unique(res.exits).tolist()}")
        correct[k] = res.predictions == y
        if k < k_gates:
            conf[k] = res.confidence
    return conf, correct


def recalibrate(bundle: str | Path, val: Any, test: Any | None, *, max_drop: float | None, budget: float | None,
                guarantee: str, delta: float, upper_bound: float | None = None, seed: int = 0,
                backend: str | None = None, runner_options: dict[str, Any] | None = None,
                time_cost: tuple[list[float], dict] | None = None, data_record: dict[str, Any] | None = None):
    """Choose the bundle's thresholds on `val` (a data.Dataset), evaluate them on `test`, rewrite the
    manifest. Returns (Calibration, test Evaluation or None, old thresholds)."""
    from .calibrate import _evaluate, calibrate_scores, check_target
    from .manifest import verify_bundle, write_manifest
    from .runtime import GatedRuntime

    check_target(max_drop=max_drop, budget=budget, guarantee=guarantee, delta=delta, upper_bound=upper_bound)
    manifest = verify_bundle(bundle)
    rt = GatedRuntime.load(bundle, backend=backend, **(runner_options or {}))
    try:
        flops = rt.manifest.exit_costs()
        base_flops = float(manifest.baseline.flops or flops[-1])
        _check_labels(val.y, manifest.num_classes)
        conf, correct = exit_scores(rt, val.x, val.y)
        test_scores = None
        if test is not None:
            _check_labels(test.y, manifest.num_classes)
            test_scores = exit_scores(rt, test.x, test.y)
        providers = getattr(rt.baseline_runner(), "providers", None)
    finally:
        rt.close()
    costs, baseline = (time_cost[0], 1.0) if time_cost else (flops, base_flops)
    result = calibrate_scores(conf, correct, confidence=manifest.confidence, costs=costs, baseline_flops=baseline,
                              max_drop=max_drop, budget=budget, upper_bound=upper_bound, guarantee=guarantee,
                              delta=delta, seed=seed)
    if time_cost:
        expected = result.validation.expected_flops
        if expected >= 1.0:
            raise UserError(
                f"On this target ({time_cost[1]['description']}) the cheapest thresholds that keep the promise "
                f"would take {expected:.3f} x the un-gated model's time: gating would slow it down. The bundle "
                "was not changed.",
                "Disable the gates (thresholds above 1) or serve the un-gated baseline on this target.")
        result.cost = dict(time_cost[1], unit="measured time / un-gated", exit_costs=list(time_cost[0]),
                           expected=float(expected))
        result.method += f"; cost: {time_cost[1]['description']}"
    result.validation = _evaluate(conf, correct, np.asarray(flops), base_flops, result.thresholds)
    test_eval = None
    if test_scores is not None:
        test_eval = _evaluate(*test_scores, np.asarray(flops), base_flops, result.thresholds)

    old = list(manifest.thresholds)
    gates = [s.gate for s in manifest.segments if s.gate is not None]
    for gate, t in zip(gates, result.thresholds):
        gate.threshold = float(t)
    manifest.calibration = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "on": {"backend": backend or manifest.backend, "precision": manifest.precision, "providers": providers},
        "data": data_record,
        "previous_thresholds": old,
        "mode": result.mode, "target": result.target, "guarantee": result.to_dict()["guarantee"],
        "promise": result.promise(), "method": result.method,
        "validation": {k: v for k, v in result.validation.to_dict().items() if k != "thresholds"},
        "cost": result.cost,
    }
    write_manifest(bundle, manifest)
    verify_bundle(bundle)
    return result, test_eval, old


def _check_labels(y: np.ndarray, num_classes: int) -> None:
    if y is None or len(y) == 0:
        raise UserError("calibrate --engine needs labelled rows: the data has no labels.",
                        "Give --data with labels (fashion-mnist, or an npz with y / y_val / y_test).")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise UserError(f"The labels hold values outside 0..{num_classes - 1}, the classes of this bundle.",
                        "Calibrate on data labelled for this model's classes.")
