"""Parity: a bundle, run by GatedRuntime (the product itself), against the torch gated model.

The build checks twice (step 5 on the ONNX graphs, step 8 on the finished engines); each run sends
every probe row out at each exit in turn (every exit's logits and every gate's confidence for every
row), runs the un-gated baseline, then two early-exit passes with compaction (the model's thresholds,
and probe thresholds that split every gate). One criterion (`within`: NaN and inf never pass), one
tolerance per precision (`tolerance`), scaled per exit with torch's own error against float64.
`rel_error` is the one relative-error measure the project uses (int8's check included).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..confidence import confidence as confidence_np
from ..contract import INPUT, LOGITS, exit_at
from ..errors import UserError
from ..runtime import GatedRuntime
from .heads import confidence_torch

PROBE_SIZE = 64  # rows of the parity probe batch (capped by max_batch)
PROBE_SEED = 0


@dataclass(frozen=True)
class Tolerance:
    """Parity tolerance: |onnx - torch| <= rel * max(1, max |torch logits|) per exit, and a confidence
    within `confidence` of a threshold makes a different exit decision acceptable (borderline)."""

    rel: float
    confidence: float


TOLERANCES = {"fp32": Tolerance(rel=1e-4, confidence=1e-4), "fp16": Tolerance(rel=2e-2, confidence=1e-2)}



@dataclass
class ParityPass:
    name: str  # "model thresholds" / "probe thresholds"
    thresholds: list[float]
    exit_counts: list[int]
    mismatched: int  # different exits, not borderline
    borderline: int  # different exits, confidence within tolerance of the threshold
    max_logit_error: float  # relative to max(1, max |torch logits|), rows with the same exit


@dataclass
class ParityReport:
    probe_rows: int
    tolerance: Tolerance
    exit_logit_errors: list[float]  # every exit, every row (nothing leaves): relative logit error
    exit_confidence_errors: list[float]  # every gate, every row: absolute confidence error
    baseline_error: float
    passes: list[ParityPass]
    tolerances: ExitTolerances | None = None  # what was applied (scaled with torch's error against float64)

    def summary(self) -> str:
        worst = max(self.exit_logit_errors + [self.baseline_error] + [p.max_logit_error for p in self.passes])
        limit = max(self.tolerances.logits) if self.tolerances else self.tolerance.rel
        return (f"{self.probe_rows} probe rows; worst logit error {worst:.2e} (tolerance {limit:.2g} "
                f"relative); exit decisions identical"
                + (f" except {sum(p.borderline for p in self.passes)} borderline" if
                   any(p.borderline for p in self.passes) else ""))

    def to_dict(self) -> dict:
        return {
            "probe_rows": self.probe_rows, "tolerance": self.tolerance.rel,
            "exit_logit_errors": self.exit_logit_errors, "exit_confidence_errors": self.exit_confidence_errors,
            "baseline_error": self.baseline_error,
            **({"logit_tolerances": self.tolerances.logits, "confidence_tolerances": self.tolerances.confidence,
                "torch_vs_float64": {"logits": self.tolerances.torch_vs_float64_logits,
                                     "confidence": self.tolerances.torch_vs_float64_confidence}}
               if self.tolerances else {}),
            "passes": [{"name": p.name, "thresholds": p.thresholds, "exit_counts": p.exit_counts,
                        "borderline": p.borderline, "max_logit_error": p.max_logit_error} for p in self.passes],
        }


def probe_thresholds(confidences: list[np.ndarray]) -> list[float]:
    """Thresholds that split the rows reaching each gate near their median confidence.

    Each threshold lies in the middle of a gap between neighbouring confidences, so no row sits on it
    (where rounding could flip its decision): the widest gap in the middle half of the sorted values,
    else the non-empty gap nearest the median. Where all rows reaching a gate have one confidence
    (saturated softmax), nobody can be split there: the threshold lets them all continue.
    """
    alive = np.arange(len(confidences[0]))
    thresholds = []
    for conf in confidences:
        values = np.sort(conf[alive].astype(np.float64))
        gaps = np.diff(values)
        if not (gaps > 0).any():
            t = float(values[-1]) + 1.0 if len(values) else 2.0
        else:
            m = len(values)
            middle = np.arange(m // 4, max(m // 4 + 1, (3 * m) // 4))
            middle = middle[middle < m - 1]
            if len(middle) and gaps[middle].max() > 0:
                j = int(middle[np.argmax(gaps[middle])])
            else:
                candidates = np.nonzero(gaps > 0)[0]
                j = int(candidates[np.argmin(np.abs(candidates - (m - 1) / 2))])
            t = float((values[j] + values[j + 1]) / 2)
        thresholds.append(t)
        alive = alive[conf[alive] < t]
    return thresholds


# The parity tolerance per exit is at least FP_HEADROOM times torch's own error at that exit, measured
# against the same model in float64 on the probe rows: two computations in the same float type (torch
# and the backend) each err by about that much, in different directions. A wrong graph (a crossed
# carry, wrong weights) errs by the values' own magnitude, orders of magnitude above.
FP_HEADROOM = 4.0


@dataclass
class ExitTolerances:
    """The tolerances check_parity applies: per exit (logits, relative) and per gate (confidence), each
    max(the precision's floor, FP_HEADROOM x torch's error against float64 there)."""

    logits: list[float]
    confidence: list[float]
    baseline: float
    torch_vs_float64_logits: list[float]
    torch_vs_float64_confidence: list[float]


def exit_tolerances(model, x, ref_logits: list, floor: Tolerance) -> ExitTolerances:
    """Measure how far torch itself, in the model's float type, is from float64 on `x` at every exit
    (ResNet-152's third gate, logits up to 190: 2.5e-4 in confidence, torch against torch), and scale
    the tolerances with it."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref64 = [lg.numpy() for lg in model64(x.double())]
        base64 = model64.backbone(x.double()).numpy()
        base = model.backbone(x)
    logit_err = [_rel64(lg, r) for lg, r in zip(ref_logits, ref64)]
    conf_err = [_abs64(confidence_np(model.confidence, _as_numpy(lg)), confidence_np(model.confidence, r))
                for lg, r in zip(ref_logits[:-1], ref64[:-1])]
    return ExitTolerances(
        logits=[max(floor.rel, FP_HEADROOM * e) for e in logit_err],
        confidence=[max(floor.confidence, FP_HEADROOM * e) for e in conf_err],
        baseline=max(floor.rel, FP_HEADROOM * _rel64(base, base64)),
        torch_vs_float64_logits=logit_err, torch_vs_float64_confidence=conf_err)


def _rel64(got: Any, ref64: np.ndarray) -> float:
    """max |got - ref| / max(1, max |ref|) in float64 (inf where either side is not finite)."""
    err = _abs64(_as_numpy(got), ref64)
    return err / max(1.0, float(np.abs(ref64).max())) if math.isfinite(err) and ref64.size else err


def _abs64(got: np.ndarray, ref64: np.ndarray) -> float:
    if ref64.size == 0:
        return 0.0
    diff = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(ref64, dtype=np.float64))
    return float(diff.max()) if np.isfinite(diff).all() else math.inf


def tolerance(precision: str) -> Tolerance:
    """The parity tolerance for a bundle of this precision (the one place that chooses it)."""
    return TOLERANCES[precision]


def within(error: float, limit: float) -> bool:
    """The parity criterion: error <= limit. NaN and inf never pass."""
    return math.isfinite(error) and error <= limit


def abs_error(got: np.ndarray, ref: Any) -> float:
    """max |got - ref| (inf when either side holds NaN or inf)."""
    ref_np = _as_numpy(ref)
    if ref_np.size == 0:
        return 0.0
    diff = np.abs(np.asarray(got, dtype=np.float32) - ref_np)
    return float(diff.max()) if np.isfinite(diff).all() else math.inf


def rel_error(got: np.ndarray, ref: Any) -> float:
    """max |got - ref| / max(1, max |ref|): the logit error (inf when either side holds NaN or inf)."""
    ref_np = _as_numpy(ref)
    if ref_np.size == 0:
        return 0.0
    err = abs_error(got, ref_np)
    return err / max(1.0, float(np.abs(ref_np).max())) if math.isfinite(err) else math.inf


def _as_numpy(ref: Any) -> np.ndarray:
    return ref.float().numpy() if hasattr(ref, "float") else np.asarray(ref, dtype=np.float32)


def check_parity(model, runtime, *, precision: str, where: str = "ONNX Runtime",
                 progress: Callable[[str], Any] = print) -> ParityReport:
    """Run the bundle with `runtime` (a GatedRuntime: the product itself) and compare it with the torch
    reference, every exit for every row and then the early-exit passes; raise UserError on a mismatch."""
    tol = tolerance(precision)
    dtype = next(model.parameters()).dtype
    rows = min(PROBE_SIZE, runtime.max_batch)
    x = torch.randn(rows, *model.input_shape, generator=torch.Generator().manual_seed(PROBE_SEED)).to(dtype)
    x_np = x.numpy()
    num_gates = model.num_gates

    def fail(what: str) -> UserError:
        return UserError(
            f"Step parity: {what}",
            "The bundle does not compute what the torch model computes. Try the other `--exporter` or "
            "another `--opset`; with --precision fp16, values may overflow float16 (try fp32); rerun with "
            "--debug and report the model.",
        )

    def run(thresholds: list[float]):
        try:
            return runtime.run(x_np, thresholds=thresholds)
        except UserError:
            raise
        except Exception as err:  # the backend's own exception types: a graph the runtime cannot feed
            raise fail(f"{where} could not run the bundle: {type(err).__name__}: {str(err).strip()[:400]}") from err

    # Every row out at exit k, for each k: every exit's logits and confidence for every row.
    ref_logits = model(x)
    ref_conf = [confidence_torch(model.confidence, lg).numpy() for lg in ref_logits[:-1]]
    tols = exit_tolerances(model, x, ref_logits, tol)
    logit_errors, conf_errors = [], []
    for k in range(num_gates + 1):
        res = run(exit_at(k, num_gates))
        if not (res.exits == k).all():
            raise fail(f"{where} sent rows to exits {np.unique(res.exits).tolist()} with every row sent to exit {k}.")
        err = rel_error(res.logits, ref_logits[k])
        logit_errors.append(err)
        if not within(err, tols.logits[k]):
            raise fail(f"{where}: exit {k}'s logits differ from torch by {err:.2e} (relative), more than "
                       f"{tols.logits[k]:.2g} (torch itself differs from float64 there by "
                       f"{tols.torch_vs_float64_logits[k]:.1e}).")
        if k < num_gates:
            cerr = abs_error(res.confidence, ref_conf[k])
            conf_errors.append(cerr)
            if not within(cerr, tols.confidence[k]):
                raise fail(f"{where}: gate {k}'s confidence differs from torch by {cerr:.2e}, more than "
                           f"{tols.confidence[k]:.2g} (torch itself differs from float64 there by "
                           f"{tols.torch_vs_float64_confidence[k]:.1e}).")
    baseline = runtime.baseline_runner()
    try:
        base_logits = baseline.run({INPUT: x_np}, host={LOGITS})[LOGITS]
    finally:
        baseline.close()
    baseline_error = rel_error(base_logits, model.backbone(x))
    if not within(baseline_error, tols.baseline):
        raise fail(f"{where}: the baseline's logits differ from torch by {baseline_error:.2e}, more than "
                   f"{tols.baseline:.2g}.")
    progress(f"        {where}, every row out at each of the {num_gates + 1} exits: logit error per exit "
             f"{fmt(logit_errors)}, confidence error per gate {fmt(conf_errors)}, baseline {baseline_error:.1e}")

    # Early exit with compaction, with the model's thresholds and with probe thresholds that split each gate.
    passes = []
    for name, thresholds in (("model thresholds", [float(t) for t in model.thresholds]),
                             ("probe thresholds", probe_thresholds(ref_conf))):
        ref = model.early_exit(x, thresholds)
        res = run(thresholds)
        exits, ref_exits = res.exits, ref.exits.numpy()
        differ = np.nonzero(exits != ref_exits)[0]
        borderline = 0
        for i in differ:
            gate = int(min(exits[i], ref_exits[i]))  # the first gate where the two paths disagree
            if not within(abs(float(ref_conf[gate][i]) - thresholds[gate]), tols.confidence[gate]):
                raise fail(f"with {name} {fmt(thresholds)}, row {i} leaves at exit {exits[i]} in {where} but "
                           f"at exit {ref_exits[i]} in torch (confidence {float(ref_conf[gate][i]):.6f} at gate "
                           f"{gate}, threshold {thresholds[gate]:.6f}).")
            borderline += 1
        same = exits == ref_exits
        err = rel_error(res.logits[same], ref.logits[torch.from_numpy(same)]) if same.any() else 0.0
        if not within(err, max(tols.logits)):
            raise fail(f"with {name}, the logits of the exits taken in {where} differ from torch by {err:.2e} "
                       "(relative).")
        counts = np.bincount(ref_exits, minlength=num_gates + 1).tolist()
        passes.append(ParityPass(name, thresholds, counts, 0, borderline, err))
        progress(f"        {name} {fmt(thresholds)}: exits per segment {counts}, "
                 f"decisions identical{f' but {borderline} borderline' if borderline else ''}, "
                 f"logit error {err:.1e}")
    return ParityReport(rows, tol, logit_errors, conf_errors, baseline_error, passes, tols)


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}" for v in values) + "]"


def check_bundle(model, bundle: Path, backend: str, precision: str,
                      progress: Callable[[str], Any]) -> ParityReport:
    """Load the bundle in `bundle` with GatedRuntime on `backend` (the product a user loads) and check it
    against the torch model; UserError on a mismatch."""
    where = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}.get(backend, backend)
    runtime = GatedRuntime.load(bundle, backend=backend)
    try:
        with torch.no_grad():
            return check_parity(model, runtime, precision=precision, where=where, progress=progress)
    finally:
        runtime.close()
