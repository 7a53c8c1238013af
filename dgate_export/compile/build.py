"""`dgate-export build`: a gated model -> a validated bundle directory, in named steps (BuildOptions).

    1 load      read model.pt safely (checkpoint.load: weights only, never code; the model is split there),
                or copy the GatedModel given in memory
    2 flops     FLOPs per segment and head (and the model cast to fp16 for --precision fp16)
    3 export    one ONNX graph per segment (export.py) and the un-gated baseline
    4 check     onnx.checker (full check, with shape inference) on every graph; with the exporter "auto"
                (the default), graphs that dynamo cannot export or that fail the checker are exported
                again by the torchscript exporter (steps 3 and 4 again, said in the progress lines)
    5 parity    a draft bundle of the ONNX graphs, run by GatedRuntime on ONNX Runtime, vs torch
   (5b quantize  --precision int8 only: quantize.py quantizes the checked float graphs, checks them against
                 the float ones and fits the thresholds on their confidences; numbered 6 of 10)
    6 engines   the backend's artifact per graph (get_backend(name).build, finish_build)
    7 manifest  manifest.json, then every hash verified
    8 verify    the finished bundle, run by GatedRuntime on its own backend, vs torch (TensorRT:
                the engines themselves; ONNX Runtime: its engines are the graphs step 5 checked)
    9 rename    the temporary directory (next to the output) becomes the output

Parity (parity.py) runs the product: the same GatedRuntime a user loads, so a bug in the runtime, the
manifest or an engine fails the build instead of shipping.

Everything is written into a temporary directory next to the output and renamed into place at the
end, so a failure at any step leaves nothing behind. An existing output is replaced (with `force`)
only after the new bundle is complete.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from .. import __version__
from ..backends import get_backend
from ..contract import INPUT
from ..data import data_file
from ..drift import reference_record
from ..errors import UserError
from ..files import replace_dir, sha256_file, temp_dir_beside
from ..images import ImagePrep
from ..manifest import (
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
from ..outputs import BUNDLE, check_output
from . import checkpoint
from .export import EXPORTERS, export_baseline, export_segment
from .model import GatedModel
from .parity import ParityReport, check_bundle, fmt
from .quantize import CalibrationData, calibration_rows, quantize_bundle, refit_target, refit_thresholds
from .threads import torch_threads

AUTO = "auto"  # BuildOptions.exporter: dynamo, then torchscript if dynamo's graphs fail
STEPS = ("load", "flops", "export", "check", "parity", "engines", "manifest", "verify", "rename")
INT8_STEPS = (*STEPS[:5], "quantize", *STEPS[5:])




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
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start  # a retried step
            prefix = f"Build failed at step {number}/{total} ({name})"
            message = err.message.removeprefix(f"Step {name}: ")
            raise UserError(f"{prefix}: {message}", err.hint) from err
        seconds = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        text = detail(result) if detail else ""
        self.progress(f"[{number}/{total}] {name:<8} {seconds:6.2f} s  {text}".rstrip())
        return result


@dataclass(frozen=True)
class BuildOptions:
    """What `build` makes of a gated model (the `dgate-export build` flags, typed)."""

    backend: str = "onnxruntime"
    precision: str = "fp32"  # fp32, fp16 (graphs exported from the half model) or int8 (static quantization)
    max_batch: int = 256  # every batch dimension is dynamic in 1..max_batch
    opset: int | None = None  # None: the exporter's
    # "auto": dynamo, and torchscript if dynamo's graphs fail to export or fail the ONNX checker (said in
    # the progress lines); "dynamo" or "torchscript": that one only.
    exporter: str = "auto"
    force: bool = False  # replace an existing bundle (only after the new one is built)
    backend_options: Mapping[str, Any] = field(default_factory=dict)  # TensorRT: opt_batch, workspace_mb, ...
    # int8: required (its training rows calibrate the quantization); fp16: optional, refits the thresholds
    # to the fp16 bundle's own confidences. Both refit for calibration.target on the validation rows.
    calibration: CalibrationData | None = None

    def check(self) -> None:
        """Everything the user can get wrong here, refused before any work (UserError)."""
        if self.precision not in PRECISIONS:
            raise UserError(f"Unknown precision {self.precision!r}.", f"Choose one of: {', '.join(PRECISIONS)}.")
        if self.precision == "int8" and self.calibration is None:
            raise UserError("--precision int8 needs calibration data.",
                            "Add --calibration-data DATA (e.g. fashion-mnist, or npz:PATH with the training rows).")
        if self.precision not in ("int8", "fp16") and self.calibration is not None:
            raise UserError("--calibration-data only applies to --precision int8 and fp16.",
                            "Drop it, or build with --precision fp16 / int8.")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise UserError(f"max batch must be a positive integer, got {self.max_batch!r}.")
        if self.opset is not None and self.opset < 18 and self.exporter == "dynamo":
            raise UserError(f"opset {self.opset} is too old for the dynamo exporter (it needs 18 or newer).",
                            "Leave --opset out, or choose 18 or newer.")
        if self.exporter not in (AUTO, *EXPORTERS):
            raise UserError(f"Unknown exporter {self.exporter!r}.", f"Choose one of: {', '.join((AUTO, *EXPORTERS))}.")

    def exporters(self) -> tuple[str, ...]:
        """The exporters to try, in order: "auto" is dynamo then torchscript (torchscript alone below opset
        18, which dynamo cannot write)."""
        if self.exporter != AUTO:
            return (self.exporter,)
        return ("torchscript",) if self.opset is not None and self.opset < 18 else ("dynamo", "torchscript")


def build_bundle(model: str | os.PathLike | GatedModel, out_dir: str | os.PathLike | None = None,
                 options: BuildOptions | None = None, *, progress: Callable[[str], Any] | None = print) -> Path:
    """Build the bundle of a gated model and return its directory: `model` is a checkpoint written by
    `gate` / `save` (default output engines/<stem>) or a GatedModel in memory (give `out_dir`; the
    model itself is not changed). The bundle is self-contained: nothing of the model's code is needed
    to run it."""
    options = options or BuildOptions()
    if isinstance(model, GatedModel):
        if out_dir is None:
            raise UserError("Building a model in memory needs the output directory.",
                            "Pass out_dir, e.g. build_bundle(model, 'engines/mymodel').")
        model_path = None
    else:
        model_path = Path(model)
    out = Path(out_dir) if out_dir is not None else Path("engines") / model_path.stem  # type: ignore[union-attr]
    options.check()
    backend_module = get_backend(options.backend)  # refuses a backend whose libraries are missing here
    calibration = options.calibration
    check_output(out, folder=BUNDLE, force=options.force,
                 reads=(model_path, data_file(calibration.data) if calibration else None,
                        options.backend_options.get("timing_cache")))
    if model_path is not None and not model_path.is_file():
        raise UserError(f"{model_path}: no such file.",
                        "Give the path of a gated model written by `dgate-export gate`.")

    steps = _Steps(progress or (lambda _line: None), INT8_STEPS if options.precision == "int8" else STEPS)
    created_parents = _make_parents(out.parent)
    tmp = temp_dir_beside(out)
    try:
        source: Path | GatedModel = model_path if model_path is not None else model  # type: ignore[assignment]
        manifest = _build_into(tmp, steps, source, out.name, options, backend_module)
        steps.run("rename", lambda: replace_dir(tmp, out, options.force), lambda _r: str(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created_parents:  # parents made for this build, innermost first, if still empty
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    total = sum(steps.timings.values())
    steps.progress(f"built {out} ({manifest.num_gates} gates, {options.backend}, {options.precision}) in {total:.1f} s")
    return out


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


def _build_into(tmp: Path, steps: _Steps, source: Path | GatedModel, name: str, options: BuildOptions,
                backend_module: Any) -> Manifest:
    """Every step but the rename, with torch on one thread: the build runs small batches (tracing, a 64-row
    probe) where a second thread gains nothing, and on a busy machine torch's spinning worker threads made the
    same build 3.5x slower (measured: demo build 29 s with 2 threads, 8 s with 1, load average 7 on 2 cores)."""
    with torch_threads(1):
        return _run_steps(tmp, steps, source, name, options, backend_module)


def _run_steps(tmp: Path, steps: _Steps, source: Path | GatedModel, name: str, options: BuildOptions,
               backend_module: Any) -> Manifest:
    precision, max_batch, opset, exporter = options.precision, options.max_batch, options.opset, options.exporter
    backend = options.backend
    int8: Any = options.calibration  # set whenever precision is int8 (BuildOptions.check)
    model_path = source if isinstance(source, Path) else None
    calibration: list[Any] = []

    def load():
        # an in-memory model is copied: the build casts to fp16 and sets eval mode, the caller's stays as it is
        loaded = checkpoint.load(source) if model_path is not None else copy.deepcopy(source).eval()
        if precision == "int8":  # bad calibration data is refused before any export
            calibration.append(calibration_rows(int8, loaded))
        return loaded

    model = steps.run("load", load, lambda m: f"{model_path or 'model in memory'} ({m.arch['name']}, "
                      f"{m.num_gates} gates, {m.num_classes} classes)"
                      + (f"; {int8.rows} calibration rows of {int8.data}" if precision == "int8" else ""))

    def count_flops():
        flops = model.flops or model.count_flops()
        if precision == "fp16":
            model.half()
        return flops

    flops = steps.run("flops", count_flops, lambda f: f"{len(model.segments)} segments at {model.exits}; FLOPs per "
                      f"segment {f['segments']}, heads {f['heads']}")

    def export_and_check(exporter: str) -> tuple[_Built, list[Path]]:
        built = _Built()

        def export() -> None:
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
        return built, paths

    exporters = options.exporters()
    failures: list[str] = []
    for attempt, exporter in enumerate(exporters):
        try:
            built, paths = export_and_check(exporter)
            break
        except UserError as err:
            at, _, what = err.message.partition(": ")  # "Build failed at step 3/9 (export)", the reason
            failures.append(f"the {exporter} exporter failed {at.removeprefix('Build failed ')}: {what}")
            if attempt + 1 == len(exporters):
                if len(failures) > 1:  # both tried: the hints' "try the other exporter" no longer applies
                    raise UserError(f"{err.message} Before it, {failures[0]}",
                                    "Both exporters failed: try another --opset; if an operation of the network has "
                                    "no ONNX equivalent, replace it or move the gate; --debug shows the traceback.") \
                        from err
                raise
            steps.progress(f"        {failures[-1]}")
            steps.progress(f"        exporting again with the {exporters[attempt + 1]} exporter (--exporter auto)")
            for stale in tmp.glob("*.onnx*"):
                stale.unlink()

    # int8: parity checks the float graphs (fp32) before they are quantized; step quantize checks those.
    float_precision = "fp32" if precision == "int8" else precision

    def parity() -> ParityReport:
        # A draft bundle whose engines are the ONNX graphs (what ONNX Runtime runs), loaded like any bundle.
        graph_entries = [{"file": p.name, "sha256": sha256_file(p)} for p in paths]
        draft = _manifest(model, built, graph_entries, {}, name=name, backend="onnxruntime",
                          precision=float_precision, max_batch=max_batch, flops=flops, model_path=model_path,
                          exporter=exporter, parity=None)
        write_manifest(tmp, draft)
        return check_bundle(model, tmp, "onnxruntime", float_precision, steps.progress)

    report = steps.run("parity", parity, lambda r: r.summary())

    quantization = None
    if precision == "int8":
        quantization = steps.run("quantize", lambda: quantize_bundle(
            model, [g.path for g in built.graphs], built.baseline.path, int8, calibration[0], backend=backend,
            progress=steps.progress), lambda q: "checked against the float graphs")

    engine_options = {"precision": precision, "max_batch": max_batch, "opt_batch": max_batch,
                      **options.backend_options}

    def engines():
        entries = []
        for path in paths:
            try:
                entries.append(backend_module.build(path, tmp, engine_options))
            except UserError as err:
                raise UserError(f"{path.name}: {err.message}", err.hint) from err
        info = backend_module.finish_build(tmp, engine_options)
        return entries, info

    engine_entries, backend_info = steps.run("engines", engines, lambda r: f"{backend}: "
                                             f"{', '.join(e['file'] for e in r[0])}")

    def manifest_step() -> Manifest:
        manifest = _manifest(model, built, engine_entries, backend_info, name=name, backend=backend,
                             precision=precision, max_batch=max_batch, flops=flops, model_path=model_path,
                             exporter=exporter, parity=report, quantization=quantization)
        write_manifest(tmp, manifest)
        if int8 is not None:  # thresholds fitted on the int8 / fp16 bundle's own confidences (calibrate --engine)
            fit = refit_thresholds(tmp, model, int8)
            target = refit_target(model, int8).to_dict()
            why = "given" if int8.target is not None else "recorded in the model" if model.calibration else "default"
            steps.progress(f"        thresholds on the {precision} bundle's confidences: {fmt(fit.thresholds)} (fp32 "
                           f"{fmt([float(t) for t in model.thresholds])}); {fit.method}; target "
                           f"{', '.join(f'{k} {v}' for k, v in target.items() if v is not None)} ({why})")
        return verify_bundle(tmp)  # the bundle as a runtime will read it

    manifest = steps.run("manifest", manifest_step,
                         lambda m: f"{MANIFEST_FILE}, {len(m.segments) + 1} graphs hashed")

    def verify() -> ParityReport | None:
        if backend == "onnxruntime" or precision == "int8":
            return None  # the engines are the graphs step 5 ran, or int8 graphs step quantize checked
        engine_report = check_bundle(model, tmp, backend, precision, steps.progress)
        assert manifest.source is not None
        manifest.source["parity_" + backend] = engine_report.to_dict()
        write_manifest(tmp, manifest)
        return engine_report

    skipped = "int8: checked at step quantize" if precision == "int8" else "its engines are the graphs step 5 checked"
    steps.run("verify", verify, lambda r: f"{backend}: " + (r.summary() if r else skipped))
    return manifest


def _names(specs: list[dict]) -> str:
    return "[" + ", ".join(s["name"] for s in specs) + "]"


def _check_graphs(paths: list[Path]) -> None:
    for path in paths:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as err:  # ValidationError, InferenceError
            raise UserError(
                f"Step check: {path.name} fails the ONNX checker: {str(err).strip().splitlines()[0]}",
                "The exporter produced an invalid graph: try the other `--exporter` or another `--opset`, "
                "and report the model.",
            ) from err


# ------------------------------------------------------------------------------------------- manifest


def _tensors(specs: list[dict]) -> list[TensorSpec]:
    return [TensorSpec(s["name"], list(s["shape"]), s["dtype"]) for s in specs]


def _manifest(model, built: _Built, engines: list[dict], backend_info: dict, *, name: str, backend: str,
              precision: str, max_batch: int, flops: dict, model_path: Path | None, exporter: str,
              parity: ParityReport | None, quantization: dict | None = None) -> Manifest:
    segments = []
    for k, graph in enumerate(built.graphs):
        gate = None
        if k < model.num_gates:
            gate = Gate(exit=model.exits[k], threshold=float(model.thresholds[k]), head=model.head_specs[k]["name"],
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
                        normalization=model.normalization,
                        image=ImagePrep.from_dict(model.image) if getattr(model, "image", None) else None),
        num_classes=model.num_classes,
        class_names=model.class_names,
        confidence=model.confidence,
        segments=segments,
        baseline=baseline,
        source={"checkpoint": model_path.name if model_path else None,
                "sha256": sha256_file(model_path) if model_path else None, "arch": model.arch["name"],
                "exits": list(model.exits), "data_split": model.data_split, "calibration": model.calibration,
                "parity": parity.to_dict() if parity else None},
        tools=_tool_versions(exporter),
        backend_info=backend_info,
        quantization=quantization,
        exit_reference=_exit_reference(model),
    )


def _exit_reference(model: GatedModel) -> dict | None:
    """The checkpoint's calibration exit mix, the drift reference, while the thresholds are still the ones it
    was recorded for (an int8 / fp16 refit replaces it with the bundle's own)."""
    record = model.calibration
    if not record or not record.get("exit_fractions"):
        return None
    if [round(float(t), 6) for t in record["thresholds"]] != [round(float(t), 6) for t in model.thresholds]:
        return None
    split = model.data_split or {}
    on = (f"validation split of {split.get('data')} ({record['rows']} rows, seed {split.get('seed')})" if split
          else f"{record['rows']} validation rows")
    return reference_record(record["exit_fractions"], record["rows"], model.thresholds, on=on,
                            by="the checkpoint's calibration (gate / calibrate)")


def _tool_versions(exporter: str) -> dict[str, str]:
    tools = {"dgate_export": __version__, "exporter": exporter}
    for package in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            tools[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tools
