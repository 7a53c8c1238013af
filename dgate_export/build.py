"""`dgate-export build`: a gated checkpoint -> a validated bundle directory, in named steps.

    1 load      read model.pt safely (checkpoint.load: weights only, never code; the model is split there)
    2 flops     FLOPs per segment and head (and the model cast to fp16 for --precision fp16)
    3 export    one ONNX graph per segment (export.py) and the un-gated baseline
    4 check     onnx.checker (full check, with shape inference) on every graph
    5 parity    a draft bundle of the ONNX graphs, run by GatedRuntime on ONNX Runtime, vs torch
   (5b quantize  --precision int8 only: quantize.py quantizes the checked float graphs, checks them against
                 the float ones and fits the thresholds on their confidences; numbered 6 of 10)
    6 engines   the backend's artifact per graph (get_backend(name).build, finish_build)
    7 manifest  manifest.json, then every hash verified
    8 verify    the finished bundle, run by GatedRuntime on its own backend, vs torch (TensorRT:
                the engines themselves; ONNX Runtime: its engines are the graphs step 5 checked)
    9 rename    the temporary directory (next to the output) becomes the output

Parity runs the product: the same GatedRuntime a user loads, so a bug in the runtime, the manifest or an
engine fails the build instead of shipping.

Everything is written into a temporary directory next to the output and renamed into place at the
end, so a failure at any step leaves nothing behind. An existing output is replaced (with `force`)
only after the new bundle is complete.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .contract import INPUT, LOGITS, exit_at
from .errors import UserError
from .files import UMASK, replace_dir, sha256_file
from .manifest import (
    MANIFEST_FILE,
    PRECISIONS,
    Baseline,
    Gate,
    InputSpec,
    Manifest,
    Segment,
    TensorSpec,
    verify_bundle,
    write_manifest,
)
from .outputs import check_writable

STEPS = ("load", "flops", "export", "check", "parity", "engines", "manifest", "verify", "rename")
INT8_STEPS = (*STEPS[:5], "quantize", *STEPS[5:])
PROBE_SIZE = 64  # rows of the parity probe batch (capped by max_batch)
PROBE_SEED = 0


@dataclass(frozen=True)
class Tolerance:
    """Parity tolerance: |onnx - torch| <= rel * max(1, max |torch logits|) per exit, and a confidence
    within `confidence` of a threshold makes a different exit decision acceptable (borderline)."""

    rel: float
    confidence: float


TOLERANCES = {"fp32": Tolerance(rel=1e-4, confidence=1e-4), "fp16": Tolerance(rel=2e-2, confidence=1e-2)}


class _Steps:
    """Numbered progress lines with timings; a UserError inside a step names the step."""

    def __init__(self, progress: Callable[[str], Any], names: tuple[str, ...] = STEPS):
        self.progress = progress
        self.names = names
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any], detail: Callable[[Any], str] | None = None) -> Any:
        number, total = self.names.index(name) + 1, len(self.names)
        start = time.perf_counter()
        try:
            result = fn()
        except UserError as err:
            prefix = f"Build failed at step {number}/{total} ({name})"
            message = err.message.removeprefix(f"Step {name}: ")
            raise UserError(f"{prefix}: {message}", err.hint) from err
        seconds = time.perf_counter() - start
        self.timings[name] = seconds
        text = detail(result) if detail else ""
        self.progress(f"[{number}/{total}] {name:<8} {seconds:6.2f} s  {text}".rstrip())
        return result


def build_bundle(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    max_batch: int = 256,
    opset: int | None = None,
    force: bool = False,
    backend_options: dict | None = None,
    progress: Callable[[str], Any] | None = print,
    exporter: str = "dynamo",
    int8: Any = None,
) -> Path:
    """Build the bundle for gated checkpoint `model_path`; return its directory (default engines/<stem>).

    `int8` (a quantize.Int8Options: calibration data, rows, threshold target) is required by precision
    "int8"; with "fp16" it is optional and only refits the thresholds to the fp16 bundle's confidences."""
    from .backends import get_backend
    from .export import EXPORTERS

    model_path = Path(model_path)
    out = Path(out_dir) if out_dir is not None else Path("engines") / model_path.stem
    # Everything the user can get wrong is refused before any work.
    if precision not in PRECISIONS:
        raise UserError(f"Unknown precision {precision!r}.", f"Choose one of: {', '.join(PRECISIONS)}.")
    if precision == "int8" and int8 is None:
        raise UserError("--precision int8 needs calibration data.",
                        "Add --calibration-data DATA (e.g. fashion-mnist, or npz:PATH with the training rows).")
    if precision not in ("int8", "fp16") and int8 is not None:
        raise UserError("--calibration-data only applies to --precision int8 and fp16.",
                        "Drop it, or build with --precision fp16 / int8.")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"max batch must be a positive integer, got {max_batch!r}.")
    if opset is not None and opset < 18 and exporter == "dynamo":
        raise UserError(f"opset {opset} is too old for the dynamo exporter (it needs 18 or newer).",
                        "Leave --opset out, or choose 18 or newer.")
    if exporter not in EXPORTERS:
        raise UserError(f"Unknown exporter {exporter!r}.", f"Choose one of: {', '.join(EXPORTERS)}.")
    backend_module = get_backend(backend)  # refuses a backend whose libraries are missing here
    _check_destination(out, force)
    check_writable(out)
    if not model_path.is_file():
        raise UserError(f"{model_path}: no such file.",
                        "Give the path of a gated model written by `dgate-export gate`.")

    steps = _Steps(progress or (lambda _line: None), INT8_STEPS if precision == "int8" else STEPS)
    created_parents = _make_parents(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _chmod_like_mkdir(tmp)
        manifest = _build_into(tmp, steps, model_path=model_path, name=out.name, backend=backend,
                               backend_module=backend_module, precision=precision, max_batch=max_batch,
                               opset=opset, backend_options=dict(backend_options or {}), exporter=exporter,
                               int8=int8)
        steps.run("rename", lambda: replace_dir(tmp, out, force), lambda _r: str(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created_parents:  # parents made for this build, innermost first, if still empty
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    total = sum(steps.timings.values())
    steps.progress(f"built {out} ({manifest.num_gates} gates, {backend}, {precision}) in {total:.1f} s")
    return out


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"The output {out} exists and is not a directory.", "Choose another -o path.")
        if not force:
            raise UserError(f"The output directory {out} already exists.",
                            "Pass --force to replace it (only after the new build succeeded), or choose "
                            "another -o path.")
        # --force replaces bundles only: never delete a directory that merely happens to be in the way.
        if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
            raise UserError(f"{out} is not empty and is not a bundle (it has no {MANIFEST_FILE}); "
                            "--force only replaces bundles.", "Choose another -o path.")


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 directories; the bundle should get the permissions a plain mkdir gives."""
    os.chmod(path, 0o777 & ~UMASK)


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing  # innermost first


@dataclass
class _Built:
    graphs: list[Any] = field(default_factory=list)  # export.ExportedGraph per segment
    baseline: Any = None


def _build_into(tmp: Path, steps: _Steps, **kwargs: Any) -> Manifest:
    """Every step but the rename, with torch on one thread: the build runs small batches (tracing, a 64-row probe) where a
    second thread gains nothing, and on a busy machine torch's spinning worker threads made the same
    build 3.5x slower (measured: demo build 29 s with 2 threads, 8 s with 1, load average 7 on 2 cores)."""
    from .threads import torch_threads

    with torch_threads(1):
        return _run_steps(tmp, steps, **kwargs)


def _run_steps(tmp: Path, steps: _Steps, *, model_path: Path, name: str, backend: str, backend_module: Any,
               precision: str, max_batch: int, opset: int | None, backend_options: dict,
               exporter: str, int8: Any) -> Manifest:

    from . import checkpoint
    from .export import export_baseline, export_segment

    calibration: list[Any] = []

    def load():
        loaded = checkpoint.load(model_path)
        if precision == "int8":  # bad calibration data is refused before any export
            from .quantize import calibration_rows

            calibration.append(calibration_rows(int8, loaded))
        return loaded

    model = steps.run("load", load, lambda m: f"{model_path} ({m.arch['name']}, {m.num_gates} gates, "
                      f"{m.num_classes} classes)" + (f"; {int8.rows} calibration rows of {int8.data}" if precision == "int8" else ""))

    def count_flops():
        flops = model.flops or model.count_flops()
        if precision == "fp16":
            model.half()
        return flops

    flops = steps.run("flops", count_flops, lambda f: f"{len(model.segments)} segments at {model.exits}; FLOPs per "
                      f"segment {f['segments']}, heads {f['heads']}")

    built = _Built()

    def export():
        for k in range(len(model.segments)):
            graph = export_segment(model, k, tmp / f"segment{k}.onnx", max_batch=max_batch, opset=opset,
                                   exporter=exporter)
            steps.progress(f"        segment{k}.onnx  {graph.seconds:5.2f} s  "
                           f"in {_names(graph.inputs)} out {_names(graph.outputs)}")
            built.graphs.append(graph)
        built.baseline = export_baseline(model, tmp / "baseline.onnx", max_batch=max_batch, opset=opset,
                                         exporter=exporter)
        steps.progress(f"        baseline.onnx  {built.baseline.seconds:5.2f} s")

    steps.run("export", export, lambda _r: f"{len(model.segments) + 1} graphs, {exporter} exporter, "
              f"opset {built.graphs[0].opset}")
    paths = [g.path for g in built.graphs] + [built.baseline.path]
    steps.run("check", lambda: _check_graphs(paths), lambda _r: "onnx.checker passed (full check)")

    # int8: parity checks the float graphs (fp32) before they are quantized; step quantize checks those.
    float_precision = "fp32" if precision == "int8" else precision

    def parity() -> ParityReport:
        # A draft bundle whose engines are the ONNX graphs (what ONNX Runtime runs), loaded like any bundle.
        graph_entries = [{"file": p.name, "sha256": sha256_file(p)} for p in paths]
        draft = _manifest(model, built, graph_entries, {}, name=name, backend="onnxruntime",
                          precision=float_precision, max_batch=max_batch, flops=flops, model_path=model_path,
                          exporter=exporter, parity=None)
        write_manifest(tmp, draft)
        return _parity_of_bundle(model, tmp, "onnxruntime", float_precision, steps.progress)

    report = steps.run("parity", parity, lambda r: r.summary())

    quantization = None
    if precision == "int8":
        from .quantize import quantize_bundle

        quantization = steps.run("quantize", lambda: quantize_bundle(
            model, [g.path for g in built.graphs], built.baseline.path, int8, calibration[0], backend=backend,
            progress=steps.progress), lambda q: "checked against the float graphs")

    options = {"precision": precision, "max_batch": max_batch, "opt_batch": max_batch, **backend_options}

    def engines():
        entries = []
        for path in paths:
            try:
                entries.append(backend_module.build(path, tmp, options))
            except UserError as err:
                raise UserError(f"{path.name}: {err.message}", err.hint) from err
        info = backend_module.finish_build(tmp, options)
        return entries, info

    engine_entries, backend_info = steps.run("engines", engines, lambda r: f"{backend}: "
                                             f"{', '.join(e['file'] for e in r[0])}")

    def manifest_step() -> Manifest:
        manifest = _manifest(model, built, engine_entries, backend_info, name=name, backend=backend,
                             precision=precision, max_batch=max_batch, flops=flops, model_path=model_path,
                             exporter=exporter, parity=report, quantization=quantization)
        write_manifest(tmp, manifest)
        if int8 is not None:  # thresholds fitted on the int8 / fp16 bundle's own confidences (calibrate --engine)
            from .quantize import refit_thresholds

            fit = refit_thresholds(tmp, model, int8)
            steps.progress(f"        thresholds on the {precision} bundle's confidences: {_fmt(fit.thresholds)} (fp32 "
                           f"{_fmt([float(t) for t in model.thresholds])}); {fit.method}")
        return verify_bundle(tmp)  # the bundle as a runtime will read it

    manifest = steps.run("manifest", manifest_step,
                         lambda m: f"{MANIFEST_FILE}, {len(m.segments) + 1} graphs hashed")

    def verify() -> ParityReport | None:
        if backend == "onnxruntime" or precision == "int8":
            return None  # the engines are the graphs step 5 ran, or int8 graphs step quantize checked
        engine_report = _parity_of_bundle(model, tmp, backend, precision, steps.progress)
        assert manifest.source is not None
        manifest.source["parity_" + backend] = engine_report.to_dict()
        write_manifest(tmp, manifest)
        return engine_report

    skipped = "int8: checked at step quantize" if precision == "int8" else "its engines are the graphs step 5 checked"
    steps.run("verify", verify, lambda r: f"{backend}: " + (r.summary() if r else skipped))
    return manifest


def _parity_of_bundle(model, bundle: Path, backend: str, precision: str,
                      progress: Callable[[str], Any]) -> ParityReport:
    """Load the bundle in `bundle` with GatedRuntime on `backend` and check it against torch."""
    import torch

    from .runtime import GatedRuntime

    where = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}.get(backend, backend)
    runtime = GatedRuntime.load(bundle, backend=backend)
    try:
        with torch.no_grad():
            return check_parity(model, runtime, precision=precision, where=where, progress=progress)
    finally:
        runtime.close()


def _names(specs: list[dict]) -> str:
    return "[" + ", ".join(s["name"] for s in specs) + "]"


def _check_graphs(paths: list[Path]) -> None:
    import onnx

    for path in paths:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as err:  # ValidationError, InferenceError
            raise UserError(
                f"Step check: {path.name} fails the ONNX checker: {str(err).strip().splitlines()[0]}",
                "The exporter produced an invalid graph: try the other `--exporter` or another `--opset`, "
                "and report the model.",
            ) from err


# --------------------------------------------------------------------------------------------- parity


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
    import copy

    import torch

    from .confidence import confidence as confidence_np

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
    import torch

    from .gates import confidence_torch

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
             f"{_fmt(logit_errors)}, confidence error per gate {_fmt(conf_errors)}, baseline {baseline_error:.1e}")

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
                raise fail(f"with {name} {_fmt(thresholds)}, row {i} leaves at exit {exits[i]} in {where} but "
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
        progress(f"        {name} {_fmt(thresholds)}: exits per segment {counts}, "
                 f"decisions identical{f' but {borderline} borderline' if borderline else ''}, "
                 f"logit error {err:.1e}")
    return ParityReport(rows, tol, logit_errors, conf_errors, baseline_error, passes, tols)


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}" for v in values) + "]"


# ------------------------------------------------------------------------------------------- manifest


def _tensors(specs: list[dict]) -> list[TensorSpec]:
    return [TensorSpec(s["name"], list(s["shape"]), s["dtype"]) for s in specs]


def _manifest(model, built: _Built, engines: list[dict], backend_info: dict, *, name: str, backend: str,
              precision: str, max_batch: int, flops: dict, model_path: Path, exporter: str,
              parity: ParityReport | None, quantization: dict | None = None) -> Manifest:
    segments = []
    for k, graph in enumerate(built.graphs):
        gate = None
        if k < model.num_gates:
            gate = Gate(exit=model.exits[k], threshold=float(model.thresholds[k]), head=model.head_spec["name"],
                        head_flops=int(flops["heads"][k]))
        segments.append(Segment(index=k, file=graph.path.name, sha256=sha256_file(graph.path), engine=engines[k],
                                inputs=_tensors(graph.inputs), outputs=_tensors(graph.outputs),
                                flops=int(flops["segments"][k]), gate=gate))
    b = built.baseline
    baseline = Baseline(file=b.path.name, sha256=sha256_file(b.path), engine=engines[-1], inputs=_tensors(b.inputs),
                        outputs=_tensors(b.outputs), flops=int(flops["baseline"]))
    first = built.graphs[0].inputs[0]
    return Manifest(
        name=name,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        backend=backend,
        precision=precision,
        max_batch=max_batch,
        opset=built.graphs[0].opset,
        input=InputSpec(name=INPUT, shape=list(first["shape"]), dtype=first["dtype"], layout="NCHW",
                        normalization=model.normalization),
        num_classes=model.num_classes,
        class_names=model.class_names,
        confidence=model.confidence,
        segments=segments,
        baseline=baseline,
        source={"checkpoint": model_path.name, "sha256": sha256_file(model_path), "arch": model.arch["name"],
                "exits": list(model.exits), "data_split": model.data_split,
                "parity": parity.to_dict() if parity else None},
        tools=_tool_versions(exporter),
        backend_info=backend_info,
        quantization=quantization,
    )


def _tool_versions(exporter: str) -> dict[str, str]:
    from importlib import metadata

    from . import __version__

    tools = {"dgate_export": __version__, "exporter": exporter}
    for package in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            tools[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tools
