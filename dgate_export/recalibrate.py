"""`calibrate --engine BUNDLE`: fit the thresholds to the bundle's own confidences (no torch).

An fp16 or int8 bundle, or another backend, computes confidences that differ from the torch model's
in the last bits or more; the thresholds that keep a promise are the ones fitted to what runs.
`exit_scores` runs the bundle's segments with `GatedRuntime` on labelled rows, once per exit with every
sample sent out there (the gates forced), and keeps each gate's confidence as the runtime computed it
and each exit's correctness. `recalibrate` chooses thresholds on the validation rows with
`calibrate.calibrate_scores` (the same `Target` and promise as for a checkpoint), then rewrites only the
gates' thresholds and a `calibration` record in manifest.json, atomically (`write_manifest`: validated,
temp file, rename; refused if another process rewrote it meanwhile, or if it is read-only). The bundle
is verified once, when the runtime loads it (every sha256); the artifacts are untouched, so every hash
the manifest lists still holds afterwards.
`calibrate_bundle` is the whole command: the recorded validation split, the data, the cost profile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import Calibration, Evaluation, Target, calibrate_scores, evaluate_scores, holdout_rows
from .contract import exit_at
from .data import Dataset, check_labels, recorded_split, rows_for_bundle
from .drift import reference_record
from .errors import UserError
from .files import sha256_file
from .manifest import MANIFEST_FILE, load_manifest, write_manifest
from .outputs import check_rewrite
from .profile import load_costs
from .runtime import GatedRuntime

EXIT_SCORE_BATCH = 256  # rows read and run at a time (the runtime compacts within it)


def exit_scores(rt, x: Any, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(conf [K, N] float32, correct [K+1, N] bool) of every exit of the runtime's bundle on labelled rows:
    data.Rows read in batches, or arrays x and y."""
    rows = x if y is None else Dataset(x, y, None, None)
    k_gates = rt.num_gates
    n = len(rows)
    conf = np.empty((k_gates, n), dtype=np.float32)
    correct = np.empty((k_gates + 1, n), dtype=bool)
    at = 0
    for xb, yb in rows.batches(min(EXIT_SCORE_BATCH, rt.max_batch)):
        _check_labels(yb, rt.num_classes)
        stop = at + len(xb)
        for k in range(k_gates + 1):
            res = rt.run(xb, thresholds=exit_at(k, k_gates))
            if not (res.exits == k).all():
                raise RuntimeError(f"forcing exit {k} sent samples to exits {np.unique(res.exits).tolist()}")
            correct[k, at:stop] = res.predictions == yb
            if k < k_gates:
                conf[k, at:stop] = res.confidence
        at = stop
    return conf, correct


@dataclass
class Recalibrated:
    calibration: Calibration
    test: Evaluation | None  # the new thresholds on the test rows, when given
    previous: list[float]  # the thresholds the manifest held before
    exits: list[str]  # the gates' exit names


def recalibrate(bundle: str | Path, val: Any, test: Any | None, *, target: Target | None = None, seed: int = 0,
                backend: str | None = None, runner_options: dict[str, Any] | None = None,
                time_cost: tuple[list[float], dict] | None = None,
                data_record: dict[str, Any] | None = None) -> Recalibrated:
    """Choose the bundle's thresholds on `val` (data.Rows: read in batches) for `target`, evaluate them on
    `test`, rewrite the manifest."""
    target = target or Target()
    manifest_path = check_rewrite(Path(bundle) / MANIFEST_FILE, "--engine")
    read = sha256_file(manifest_path)  # the version this calibration starts from (see write_manifest below)
    rt = GatedRuntime.load(bundle, backend=backend, **(runner_options or {}))  # verifies every sha256
    manifest = rt.manifest
    try:
        flops = manifest.exit_costs()
        base_flops = float(manifest.baseline.flops or flops[-1])
        conf, correct = exit_scores(rt, val)
        test_scores = exit_scores(rt, test) if test is not None else None
        providers = getattr(rt.baseline_runner(), "providers", None)
    finally:
        rt.close()
    costs, baseline = (time_cost[0], 1.0) if time_cost else (flops, base_flops)
    result = calibrate_scores(conf, correct, confidence=manifest.confidence, costs=costs, baseline_flops=baseline,
                              target=target, seed=seed, num_classes=manifest.num_classes)
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
        # the report in FLOPs, on the rows each figure was made on (the choice was in units of time)
        rows, out = np.arange(conf.shape[1]), None
        if target.holdout is not None:
            rows, out = holdout_rows(conf.shape[1], target.holdout, seed)
            result.held_out = evaluate_scores(conf[:, out], correct[:, out], np.asarray(flops), base_flops,
                                              result.thresholds)
        result.validation = evaluate_scores(conf[:, rows], correct[:, rows], np.asarray(flops), base_flops,
                                            result.thresholds)
    test_eval = None
    if test_scores is not None:
        test_eval = evaluate_scores(*test_scores, np.asarray(flops), base_flops, result.thresholds)

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
        "target_options": target.to_dict(),
        "promise": result.promise(), "method": result.method,
        "validation": {k: v for k, v in result.validation.to_dict().items() if k != "thresholds"},
        "held_out": result.held_out.to_dict() if result.held_out is not None else None,
        "cost": result.cost,
    }
    data = data_record or {}
    manifest.exit_reference = reference_record(
        result.validation.exit_fractions, result.validation.samples, result.thresholds, by="calibrate --engine",
        on=f"validation split of {data.get('spec')} ({result.validation.samples} rows, seed {data.get('seed')})")
    # validated, atomic; the artifacts (and their hashes) are untouched. Refused if another process rewrote
    # the manifest meanwhile (a second calibrate --engine): its update is kept, not silently lost.
    write_manifest(bundle, manifest, expect_sha256=read)
    return Recalibrated(result, test_eval, old, [g.exit for g in gates])


def calibrate_bundle(bundle: str | Path, data: str, *, target: Target | None = None, data_dir: str | None = None,
                     repeat_channels: bool = False, val_size: int | None = None, seed: int | None = None,
                     cost_path: str | Path | None = None, cost_batch: int | None = None,
                     warn: Callable[[str], Any] | None = None) -> Recalibrated:
    """`dgate-export calibrate --engine BUNDLE --data DATA`: thresholds fitted on the validation split the
    bundle records (its checkpoint's), reported on the test split; `cost_path` (a `dgate-export profile`)
    minimizes measured time instead of FLOPs. `warn` gets a line when DATA is not what the model was gated on."""
    target = target or Target()
    manifest = load_manifest(bundle)  # a clear error before any data is read; hashes: when the runtime loads it
    check_rewrite(Path(bundle) / MANIFEST_FILE, "--engine")  # a read-only bundle: before the data is loaded
    data_split = (manifest.source or {}).get("data_split")
    val_size, seed = recorded_split(data_split, f"{bundle} (built from {(manifest.source or {}).get('checkpoint')})",
                                    val_size, seed)
    if cost_batch is not None and not cost_path:
        raise UserError("--cost-batch chooses a batch size of a --cost profile.", "Add --cost profile.json.")
    time_cost = load_costs(cost_path, batch_size=cost_batch, manifest=manifest) if cost_path else None
    gated_on = (data_split or {}).get("data")
    if gated_on and gated_on != data and warn is not None:
        warn(f"warning: {bundle} was gated on --data {gated_on}, this calibrates on {data}: its validation "
             "rows must be ones the gates were never trained on.")
    splits = rows_for_bundle(manifest, data, ("val", "test"), where=str(bundle), data_dir=data_dir,
                             repeat_channels=repeat_channels, val_size=val_size, seed=seed)
    record = {"spec": data, "val_size": val_size, "seed": seed, "rows": len(splits["val"])}
    return recalibrate(bundle, splits["val"], splits["test"], target=target, seed=seed, time_cost=time_cost,
                       data_record=record)


def _check_labels(y: np.ndarray | None, num_classes: int) -> None:
    if y is None or len(y) == 0:
        raise UserError("calibrate --engine needs labelled rows: the data has no labels.",
                        "Give --data with labels (fashion-mnist, or an npz with y / y_val / y_test).")
    check_labels(y, num_classes)
