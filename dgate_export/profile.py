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
            "batches": batches,
        }
    finally:
        rt.close()


def write_profile(profile: dict[str, Any], path: str | Path) -> Path:
    from .files import write_text_atomic

    return write_text_atomic(path, json.dumps(profile, indent=1) + "\n")


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
    bundle, batches = data.get("bundle") or {}, data.get("batches") or []
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
    sizes = [int(b.get("batch_size", -1)) for b in batches]
    if batch_size is None:
        if len(sizes) != 1:
            raise UserError(f"{where} holds times at batch sizes {sizes}.", "Choose one with --cost-batch B.")
        batch_size = sizes[0]
    if batch_size not in sizes:
        raise UserError(f"{where} holds times at batch size(s) {sizes}, not at {batch_size}: times per sample "
                        "depend on the batch size.", f"Profile at that size: dgate-export profile BUNDLE --batch-size "
                        f"{batch_size} -o profile.json, or choose one of {sizes} with --cost-batch.")
    entry = batches[sizes.index(batch_size)]
    costs = [float(v) for v in entry.get("exit_time_costs", [])]
    expected = len(bundle.get("segment_flops") or []) or len(costs)
    if len(costs) != expected or len(costs) < 2 or not all(np.isfinite(costs)) or min(costs) <= 0:
        raise UserError(f"{where}: the exit times at batch {batch_size} are malformed ({costs}).",
                        "Write the profile again with `dgate-export profile`.")
    providers = bundle.get("providers")
    desc = (f"measured time at batch {batch_size} on {bundle.get('backend')}"
            + (f" ({', '.join(providers)})" if providers else "") + f", profile {path}")
    return costs, {"batch_size": batch_size, "description": desc, "profile": str(path)}
