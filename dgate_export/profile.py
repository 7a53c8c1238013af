"""`dgate-export profile`: the measured time of leaving at each exit, on the backend that runs the bundle
(no torch). `calibrate --cost profile.json` then minimizes expected measured time instead of FLOPs.

For each batch size, `bench.exit_time_costs` times the chain with every sample leaving at exit k
(segments 0..k and gates 0..k run), interleaved with the un-gated baseline: cost_k = time_k / time of
the baseline, for k = 0..K. Expected relative time of thresholds = sum_k (fraction leaving at k) * cost_k;
below 1 the gated chain is faster than the un-gated model on that target. The inputs are random: with the
gates forced open or shut, the data does not change what runs.

The profile names what it measured: the bundle's fingerprint (the sha256 of its artifacts' sha256 list:
thresholds are not in it, so re-calibrating keeps it), its exits and FLOPs per segment (what a gated
checkpoint is checked against), the backend, providers, machine, and the load while measuring
(schema "dgate-profile/1", docs/bench.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .manifest import Manifest, bundle_files

SCHEMA = "dgate-profile/1"


def fingerprint(manifest: Manifest) -> str:
    """sha256 over the bundle's artifacts (file name and sha256, sorted): what runs, not the thresholds."""
    text = "\n".join(f"{name} {sha}" for name, sha in sorted(bundle_files(manifest).items()))
    return hashlib.sha256(text.encode()).hexdigest()


def structure(manifest: Manifest) -> dict[str, Any]:
    """Exits, FLOPs per segment and per head: what a gated checkpoint must match to use the profile."""
    return {"exits": [s.gate.exit for s in manifest.segments if s.gate is not None],
            "segment_flops": [s.flops for s in manifest.segments],
            "head_flops": [s.gate.head_flops for s in manifest.segments if s.gate is not None]}


def measure(bundle: str | Path, batch_sizes: list[int], *, backend: str | None = None,
            runner_options: dict[str, Any] | None = None, warmup_ms: float = 200.0,
            min_seconds: float = 2.0, seed: int = 0) -> dict[str, Any]:
    """The profile of a bundle at these batch sizes (a dict, schema dgate-profile/1)."""
    from .bench import exit_time_costs
    from .runtime import GatedRuntime

    if not (isinstance(min_seconds, (int, float)) and math.isfinite(min_seconds) and min_seconds > 0):
        raise UserError(f"min_seconds must be a positive number of seconds, got {min_seconds!r}.",
                        "Give e.g. --min-seconds 2.")
    rt = GatedRuntime.load(bundle, backend=backend, **(runner_options or {}))
    try:
        manifest = rt.manifest
        bad = [b for b in batch_sizes if not 1 <= b <= manifest.max_batch]
        if bad or not batch_sizes:
            raise UserError(f"Batch sizes {batch_sizes} must lie in 1..{manifest.max_batch}, the range this bundle "
                            "was built for.", "Give e.g. --batch-size 1.")
        baseline = rt.baseline_runner()
        rt.warmup()
        costs = rt.manifest.exit_costs()
        chw = tuple(int(d) for d in manifest.input.shape[1:])
        x = np.random.default_rng(seed).standard_normal((max(batch_sizes) * 2, *chw), dtype=np.float32)
        load_before = os.getloadavg()
        batches = []
        for b in batch_sizes:
            rel = exit_time_costs(rt, baseline, x, b, costs, float(manifest.baseline.flops or costs[-1]),
                                  warmup_ms=warmup_ms, min_seconds=min_seconds)
            batches.append({"batch_size": b, "exit_time_costs": [float(v) for v in rel]})
        return {
            "schema": SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "bundle": {"path": str(bundle), "name": manifest.name, "fingerprint": fingerprint(manifest),
                       "backend": backend or manifest.backend, "precision": manifest.precision,
                       "providers": getattr(baseline, "providers", None), **structure(manifest)},
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "load_average": [*load_before, *os.getloadavg()]},
            "min_seconds": float(min_seconds),
            "batches": batches,
        }
    finally:
        rt.close()


def write_profile(profile: dict[str, Any], path: str | Path) -> Path:
    from .files import write_text_atomic

    return write_text_atomic(path, json.dumps(profile, indent=1) + "\n")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def profile_problems(data: dict[str, Any]) -> list[str]:
    """What is wrong with a profile's fields (types, ranges, finite, positive), as phrases; [] when nothing.
    Checked: everything `load_costs` reads and the measurement's own minimum time."""
    problems: list[str] = []

    def bad(field: str, value: Any, expected: str) -> None:
        problems.append(f"{field} is {json.dumps(value)[:60]}, expected {expected}")

    bundle = data.get("bundle")
    if not isinstance(bundle, dict):
        bad("bundle", bundle, "an object")
        bundle = {}
    if not isinstance(bundle.get("fingerprint"), str):
        bad("bundle.fingerprint", bundle.get("fingerprint"), "a string")
    for key in ("path", "backend"):
        if key in bundle and not isinstance(bundle[key], str):
            bad(f"bundle.{key}", bundle[key], "a string")
    exits = bundle.get("exits")
    if not (isinstance(exits, list) and exits and all(isinstance(e, str) for e in exits)):
        bad("bundle.exits", exits, "a list of module names")
    for key in ("segment_flops", "head_flops"):
        flops = bundle.get(key)
        if not (isinstance(flops, list) and all(_whole(f, 0) for f in flops)):
            bad(f"bundle.{key}", flops, "a list of whole numbers >= 0")
    providers = bundle.get("providers")
    if providers is not None and not (isinstance(providers, list) and all(isinstance(p, str) for p in providers)):
        bad("bundle.providers", providers, "a list of provider names or null")
    if "min_seconds" in data and not (_number(data["min_seconds"]) and data["min_seconds"] > 0):
        bad("min_seconds", data["min_seconds"], "a positive number of seconds")
    segments = bundle.get("segment_flops")
    exits_expected = len(segments) if isinstance(segments, list) and len(segments) >= 2 else None
    batches = data.get("batches")
    if not (isinstance(batches, list) and batches):
        bad("batches", batches, "a non-empty list")
        return problems
    sizes = []
    for i, entry in enumerate(batches):
        where = f"batches[{i}]"
        if not isinstance(entry, dict):
            bad(where, entry, "an object")
            continue
        size = entry.get("batch_size")
        if not _whole(size, 1):
            bad(f"{where}.batch_size", size, "a whole number >= 1")
        elif size in sizes:
            problems.append(f"{where}.batch_size {size} appears twice")
        sizes.append(size)
        costs = entry.get("exit_time_costs")
        count = f"{exits_expected} " if exits_expected else "at least 2 "
        if not (isinstance(costs, list) and all(_number(c) and c > 0 for c in costs)
                and len(costs) == (exits_expected or max(len(costs), 2))):
            bad(f"{where}.exit_time_costs", costs, f"a list of {count}finite positive times (one per exit)")
    return problems


def load_costs(path: str | Path, *, batch_size: int | None, manifest: Manifest | None = None,
               model_structure: dict[str, Any] | None = None) -> tuple[list[float], dict[str, Any]]:
    """Relative exit costs (k = 0..K; the un-gated model = 1) from a profile, for one batch size, checked
    against the bundle (`manifest`: same fingerprint) or a gated checkpoint (`model_structure`: same exits
    and FLOPs). Returns (costs, description)."""
    where = f"--cost {path}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise UserError(f"{where}: no such file.", "Write one with `dgate-export profile BUNDLE -o profile.json`.") from err
    except (OSError, ValueError) as err:
        raise UserError(f"{where} is not a readable JSON profile ({err}).",
                        "Write one with `dgate-export profile BUNDLE -o profile.json`.") from err
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UserError(f"{where} is not a {SCHEMA} profile.", "Write one with `dgate-export profile BUNDLE -o profile.json`.")
    problems = profile_problems(data)
    if problems:
        raise UserError(f"{where} is a malformed {SCHEMA} profile: {'; '.join(problems)}.",
                        "Write it again with `dgate-export profile BUNDLE -o profile.json` rather than by hand.")
    bundle, batches = data["bundle"], data["batches"]
    if manifest is not None and bundle.get("fingerprint") != fingerprint(manifest):
        raise UserError(f"{where} was measured on another bundle ({bundle.get('path')}, fingerprint "
                        f"{str(bundle.get('fingerprint'))[:12]}…) than this one ({fingerprint(manifest)[:12]}…): its times "
                        "do not describe these engines.", "Profile this bundle: dgate-export profile BUNDLE -o profile.json.")
    if model_structure is not None:
        mine = {k: bundle.get(k) for k in model_structure}
        if mine != model_structure:
            raise UserError(f"{where} was measured on a bundle with other exits or FLOPs ({bundle.get('exits')}) than "
                            f"this model ({model_structure['exits']}).",
                            "Build this model and profile that bundle: dgate-export build MODEL; dgate-export profile "
                            "engines/MODEL -o profile.json.")
    sizes = [b["batch_size"] for b in batches]
    if batch_size is None:
        if len(sizes) != 1:
            raise UserError(f"{where} holds times at batch sizes {sizes}.", "Choose one with --cost-batch B.")
        batch_size = sizes[0]
    if batch_size not in sizes:
        raise UserError(f"{where} holds times at batch size(s) {sizes}, not at {batch_size}: times per sample "
                        "depend on the batch size.", f"Profile at that size: dgate-export profile BUNDLE --batch-size "
                        f"{batch_size} -o profile.json, or choose one of {sizes} with --cost-batch.")
    entry = batches[sizes.index(batch_size)]
    costs = [float(v) for v in entry["exit_time_costs"]]
    providers = bundle.get("providers")
    desc = (f"measured time at batch {batch_size} on {bundle.get('backend')}"
            + (f" ({', '.join(providers)})" if providers else "") + f", profile {path}")
    return costs, {"batch_size": batch_size, "description": desc, "profile": str(path)}
