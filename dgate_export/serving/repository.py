"""Write a Triton model repository from a bundle (`dgate-export triton BUNDLE -o REPO`).

Layout (NAME is the bundle's name, or --name):

    REPO/README.md                    how to serve it
    REPO/dgate-repository.json        the marker: what wrote it (`triton --force` replaces only such a folder)
    REPO/NAME/config.pbtxt            the gate model: Python backend, business logic scripting (BLS)
    REPO/NAME/1/model.py              -> runs GatedRuntime's loop with the segment models as runners
    REPO/NAME/1/manifest.json, gate.json, dgate_export/ (the torch-free runtime modules it imports)
    REPO/NAME_seg0 .. NAME_segK/      one model per segment, dynamic_batching
    REPO/NAME_baseline/               the un-gated network, dynamic_batching (the honest comparison)
    REPO/NAME_unbatched*/             with --unbatched: the gate model over segment copies that run one
                                      request at a time (no dynamic batching), for benchmarks

Why segment models k>0 have no `index` input: in a bundle, segment k>0 takes the previous segment's
carries for all of its rows plus the row numbers of the survivors, and gathers them as its first op.
Triton's dynamic batcher concatenates the requests it merges along the first dimension, so row numbers
sent by different requests would point into each other's rows. In the repository the gate model
compacts the carries itself (it keeps the survivors' rows) and `index` is 0..rows-1 (an identity
gather): every input of every segment model is then batched by rows, and the batcher may merge any
requests. Where that `index` comes from depends on the platform:

- `python`: the bundle's graph as it is; the segment model (model_segment.py) feeds `index` itself.
  Needs nothing beyond the plain install.
- `onnxruntime`, `tensorrt`: Triton runs the graph (or engine) with no code of ours around it, so
  segment k>0's graph is rewritten to compute `index` from its first carry (drop_index: Shape ->
  Range), which needs the onnx package (the `[onnx]` extra).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import INDEX, INPUT
from ..errors import UserError
from ..files import replace_dir, temp_dir_beside
from ..manifest import CARRY_IN_PREFIX, Manifest, TensorSpec, verify_bundle
from ..outputs import REPOSITORY, REPOSITORY_FORMAT, check_output

PLATFORMS = ("auto", "onnxruntime", "tensorrt", "python")
KINDS = ("cpu", "gpu")
GATE_TEMPLATE = "model_gate.py"
SEGMENT_TEMPLATE = "model_segment.py"
UNBATCHED_SUFFIX = "_unbatched"
RAW_INPUT = "input_raw"  # the gate model's UINT8 input (raw pixels) when the bundle has a normalization
GATE_OUTPUTS = (("logits", "TYPE_FP32", -2), ("predictions", "TYPE_INT64", -1), ("exits", "TYPE_INT64", -1),
                ("confidence", "TYPE_FP32", -1))  # -2: [N, classes], -1: [N]
THRESHOLDS_PARAMETER = "thresholds"  # the request parameter that overrides the thresholds
PROBE_PARAMETER = "dgate_probe"  # marks serve's health probe: answered, not counted (model_gate.PROBE)
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HERE = Path(__file__).resolve().parent
_PACKAGE = _HERE.parent  # dgate_export/
# drop_index's onnx: a small extra of its own rather than [compile], which brings torch (gigabytes) to a
# serving host that only writes a repository.
ONNX_HINT = ("Install it: pip install 'dgate-export[onnx]'; or write the repository with --platform python "
             "(ONNX Runtime in Triton's Python backend), which ships the bundle's graphs as they are.")


@dataclass
class RepositoryInfo:
    """What write_repository wrote: model names (the gate model first) and the platform used."""
    path: Path
    name: str
    platform: str
    models: list[str]


def write_repository(bundle: str | Path, out: str | Path, *, platform: str = "auto", instances: int = 8,
                     segment_instances: int = 1, max_queue_delay_us: int = 0, kind: str = "cpu",
                     name: str | None = None, threads: int = 1, unbatched: bool = False,
                     gate_batching: bool = False, force: bool = False) -> RepositoryInfo:
    """Write the Triton model repository of `bundle` to `out`, atomically (a temp folder renamed at the end).

    `instances`: instances of the gate model, i.e. requests whose loop runs at the same time (each
    waits on its segment calls; the survivors of all of them meet in the segment models' queues).
    `segment_instances`: instances of each segment model. `threads`: ONNX Runtime intra-op threads per
    segment instance (python platform; onnxruntime platform: the backend's intra_op_thread_count).
    `gate_batching`: the gate model (`NAME` only, not the unbatched copy) gets dynamic batching too, so
    requests with the same thresholds share one chain of segment calls; a request is then at most
    max_batch rows, and the [N] outputs are declared dims [1] with reshape [] (docs/serving.md).
    """
    out = check_output(out, folder=REPOSITORY, force=force, reads=(bundle,))  # before any work
    manifest = verify_bundle(bundle)
    if platform not in PLATFORMS:
        raise UserError(f"Unknown platform {platform!r}.", f"Choose one of: {', '.join(PLATFORMS)}.")
    if kind not in KINDS:
        raise UserError(f"Unknown instance kind {kind!r}.", f"Choose one of: {', '.join(KINDS)}.")
    for what, value in (("--instances", instances), ("--segment-instances", segment_instances),
                        ("--threads", threads)):
        if value < 1:
            raise UserError(f"{what} must be at least 1, got {value}.")
    if max_queue_delay_us < 0:
        raise UserError(f"--max-queue-delay-us must be >= 0, got {max_queue_delay_us}.")
    if platform == "auto":
        platform = "tensorrt" if manifest.backend == "tensorrt" else "onnxruntime"
    if platform == "tensorrt" and manifest.backend != "tensorrt":
        raise UserError(f"--platform tensorrt needs a TensorRT bundle; {bundle} was built for {manifest.backend}.",
                        "Build it with `dgate-export build MODEL --backend tensorrt` on the GPU host, or use "
                        "--platform onnxruntime (or python).")
    if platform == "tensorrt" and kind != "gpu":
        raise UserError("--platform tensorrt runs on GPUs only.", "Add --kind gpu.")
    name = name or manifest.name
    if not _NAME.match(name):
        raise UserError(f"{name!r} is not usable as a Triton model name.",
                        "Give one with --name (letters, digits, '_', '.', '-').")
    if platform != "python":
        _onnx(f"--platform {platform}")  # before anything is written
    tmp = temp_dir_beside(out)
    try:
        writer = _Writer(manifest, tmp, platform, kind, max_queue_delay_us, segment_instances, threads,
                         gate_batching)
        models = writer.write_all(name, instances, unbatched)
        shutil.rmtree(tmp / ".graphs", ignore_errors=True)  # the gather-free graphs, copied into their models
        (tmp / "README.md").write_text(_readme(manifest, name, platform, kind, models, out.name), encoding="utf-8")
        # the marker that lets --force recognise this folder as a repository (outputs.REPOSITORY)
        _write(tmp / REPOSITORY.marker, json.dumps({"format": REPOSITORY_FORMAT, "bundle": manifest.name,
                                                    "platform": platform, "models": models}, indent=2) + "\n")
        replace_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RepositoryInfo(path=out, name=name, platform=platform, models=models)


class _Writer:
    def __init__(self, manifest: Manifest, root: Path, platform: str, kind: str, delay_us: int,
                 segment_instances: int, threads: int, gate_batching: bool = False):
        self.gate_batching = gate_batching
        self.m = manifest
        self.root = root
        self.platform = platform
        self.kind = kind
        self.delay_us = delay_us
        self.segment_instances = segment_instances
        self.threads = threads
        self._graphs: dict[int, Path] = {}  # segment index -> the repository's graph (written once)

    def write_all(self, name: str, instances: int, unbatched: bool) -> list[str]:
        seg_names = [f"{name}_seg{s.index}" for s in self.m.segments]
        models = [name, *seg_names]
        self.gate_model(name, seg_names, instances, batching=self.gate_batching)
        for seg, seg_name in zip(self.m.segments, seg_names):
            self.segment_model(seg_name, seg.index, batching=True)
        base = f"{name}_baseline"
        self.baseline_model(base)
        models.append(base)
        if unbatched:
            plain = f"{name}{UNBATCHED_SUFFIX}"
            plain_segs = [f"{plain}_seg{s.index}" for s in self.m.segments]
            self.gate_model(plain, plain_segs, instances, batching=False)  # no batching anywhere in this chain
            for seg, seg_name in zip(self.m.segments, plain_segs):
                self.segment_model(seg_name, seg.index, batching=False)
            models += [plain, *plain_segs]
        return models

    # ------------------------------------------------------------------------------------ the models

    def gate_model(self, name: str, segment_models: list[str], instances: int, batching: bool) -> None:
        m = self.m
        version = self._model_dir(name)
        c, h, w = (int(d) for d in m.input.shape[1:])
        lead = [] if batching else [-1]  # batched: Triton's batch dimension stands for N
        inputs = [_tensor_config(INPUT, _TRITON_TYPES[m.input.dtype], [*lead, c, h, w],
                                 optional=m.input.normalization is not None)]
        if m.input.normalization is not None:
            inputs.append(_tensor_config(RAW_INPUT, "TYPE_UINT8", [*lead, c, h, w], optional=True))
        if batching:
            outputs = [_tensor_config(n, t, [m.num_classes]) if d == -2 else _tensor_config(n, t, [1], reshape=True)
                       for n, t, d in GATE_OUTPUTS]
        else:
            outputs = [_tensor_config(n, t, [-1, m.num_classes] if d == -2 else [-1]) for n, t, d in GATE_OUTPUTS]
        batch_lines = [f"max_batch_size: {m.max_batch}",
                       f"dynamic_batching {{ max_queue_delay_microseconds: {self.delay_us} }}"] if batching \
            else ["max_batch_size: 0"]
        config = [f'name: "{name}"', 'backend: "python"', *batch_lines,
                  _block("input", inputs), _block("output", outputs),
                  f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]"]
        _write(version.parent / "config.pbtxt", "\n".join(config) + "\n")
        shutil.copyfile(_HERE / GATE_TEMPLATE, version / "model.py")
        _vendor(version, "runtime.py")
        _write(version / "manifest.json", json.dumps(m.to_dict(), indent=2) + "\n")
        gate = {"segments": [{"model": model, "inputs": self._inputs(seg.index),
                              "outputs": [t.name for t in seg.outputs]}
                             for model, seg in zip(segment_models, m.segments)]}
        _write(version / "gate.json", json.dumps(gate, indent=2) + "\n")

    def segment_model(self, name: str, index: int, batching: bool) -> None:
        seg = self.m.segments[index]
        inputs = [t for t in seg.inputs if t.name != INDEX]
        artifact = seg.engine["file"] if self.platform == "tensorrt" else seg.file
        self._model(name, inputs, seg.outputs, self._graph(index, artifact), batching)

    def baseline_model(self, name: str) -> None:
        b = self.m.baseline
        artifact = b.engine["file"] if self.platform == "tensorrt" else b.file
        self._model(name, b.inputs, b.outputs, self.m.path(artifact), batching=True)

    def _model(self, name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], graph: Path,
               batching: bool) -> None:
        version = self._model_dir(name)
        config = [f'name: "{name}"']
        kind = "KIND_GPU" if self.kind == "gpu" else "KIND_CPU"
        if self.platform == "python":
            config.append('backend: "python"')
            shutil.copyfile(_HERE / SEGMENT_TEMPLATE, version / "model.py")
            _vendor(version, "backends/onnxruntime.py")
            _vendor(version, "contract.py")
            shutil.copyfile(graph, version / "model.onnx")
            params = {"intra_op_num_threads": str(self.threads), "providers": "cuda" if self.kind == "gpu" else "cpu"}
        elif self.platform == "onnxruntime":
            config.append('platform: "onnxruntime_onnx"')
            shutil.copyfile(graph, version / "model.onnx")
            params = {"intra_op_thread_count": str(self.threads)}
        else:
            config.append('platform: "tensorrt_plan"')
            shutil.copyfile(graph, version / "model.plan")
            params = {}
        config.append(f"max_batch_size: {self.m.max_batch}")
        config.append(_block("input", [_batched(t) for t in inputs]))
        config.append(_block("output", [_batched(t) for t in outputs]))
        if batching:
            config.append(f"dynamic_batching {{ max_queue_delay_microseconds: {self.delay_us} }}")
        config.append(f"instance_group [ {{ count: {self.segment_instances} kind: {kind} }} ]")
        config += [f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items()]
        _write(version.parent / "config.pbtxt", "\n".join(config) + "\n")

    # ------------------------------------------------------------------------------------- helpers

    def _inputs(self, index: int) -> list[str]:
        """The segment model's inputs: the bundle's, less `index` (see the module docstring)."""
        return [t.name for t in self.m.segments[index].inputs if t.name != INDEX]

    def _graph(self, index: int, artifact: str) -> Path:
        """The artifact the repository ships for segment `index` (built once, shared by its copies)."""
        if index == 0 or self.platform == "python":  # python: model_segment.py feeds `index` itself
            return self.m.path(artifact)
        if index not in self._graphs:
            work = self.root / ".graphs"
            work.mkdir(exist_ok=True)
            onnx_path = work / f"segment{index}.onnx"
            drop_index(self.m.path(self.m.segments[index].file), onnx_path)
            if self.platform == "tensorrt":
                onnx_path = _build_plan(onnx_path, work, self.m)
            self._graphs[index] = onnx_path
        return self._graphs[index]

    def _model_dir(self, name: str) -> Path:
        version = self.root / name / "1"
        version.mkdir(parents=True)
        return version


def drop_index(src: Path, dst: Path) -> None:
    """Copy segment k>0's ONNX graph without its `index` input: `index` becomes 0..rows-1 computed from
    the first carry's leading dimension, so the graph's Gather keeps every row, in order."""
    onnx = _onnx("Rewriting a segment graph for Triton's native backends")
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    index = [i for i in graph.input if i.name == INDEX]
    carries = [i.name for i in graph.input if i.name.startswith(CARRY_IN_PREFIX)]
    if len(index) != 1 or not carries:
        raise UserError(f"{src.name} has no 'index' input or no carries, so it is not a segment k>0 graph.",
                        "Rebuild the bundle with `dgate-export build`.")
    graph.input.remove(index[0])
    p = "dgate_triton_"
    graph.initializer.extend([helper.make_tensor(p + "zero", TensorProto.INT64, [], [0]),
                              helper.make_tensor(p + "one", TensorProto.INT64, [], [1])])
    nodes = [helper.make_node("Shape", [carries[0]], [p + "shape"], name=p + "shape", start=0, end=1),
             helper.make_node("Squeeze", [p + "shape"], [p + "rows"], name=p + "rows"),
             helper.make_node("Range", [p + "zero", p + "rows", p + "one"], [INDEX], name=p + INDEX)]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.save(model, str(dst))


def _onnx(what: str) -> Any:
    """The onnx module, or a UserError naming the extra that brings it."""
    try:
        import onnx
    except ImportError as err:
        raise UserError(f"{what} needs the onnx package, which is not installed here ({err}).",
                        ONNX_HINT) from err
    return onnx


def _build_plan(onnx_path: Path, work: Path, manifest: Manifest) -> Path:
    """A TensorRT engine of a gather-free segment graph, built with the settings the bundle's engines
    record (precision, batch range, TF32, hardware compatibility, workspace) and their timing cache.
    Not run here: no TensorRT where this was written (docs/serving.md)."""
    from .. import backends

    module = backends.get_backend("tensorrt")  # a clear error where TensorRT is missing
    info = manifest.backend_info
    options: dict = {"precision": manifest.precision, "max_batch": manifest.max_batch}
    for key in ("opt_batch", "workspace_mb", "tf32"):
        if info.get(key) is not None:
            options[key] = info[key]
    if info.get("hardware_compatibility") not in (None, "NONE"):  # common.HW_NONE (no tensorrt import here)
        options["hardware_compatible"] = True
    cache = info.get("timing_cache")
    if cache and manifest.path(cache).is_file() and not (work / cache).exists():
        shutil.copyfile(manifest.path(cache), work / cache)  # the builder starts from out_dir's cache
    entry = module.build(onnx_path, work, options)
    return work / entry["file"]


def _batched(t: TensorSpec) -> str:
    """A batched tensor (Triton drops the leading batch dimension from `dims`); [batch] becomes dims [1]
    reshaped to [] since Triton has no zero-dimensional tensors in a batched model's config."""
    dims = [int(d) for d in t.shape[1:]]
    if not dims:
        return _tensor_config(t.name, _TRITON_TYPES[t.dtype], [1], reshape=True)
    return _tensor_config(t.name, _TRITON_TYPES[t.dtype], dims)


def _tensor_config(name: str, dtype: str, dims: list[int], optional: bool = False, reshape: bool = False) -> str:
    text = f'{{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]'
    if reshape:
        text += " reshape: { shape: [ ] }"
    if optional:
        text += " optional: true"
    return text + " }"


def _block(key: str, items: list[str]) -> str:
    return f"{key} [\n  " + ",\n  ".join(items) + "\n]"


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def package_modules(entry: str) -> list[str]:
    """`entry` (a path inside dgate_export/) and every package module it imports, transitively, as paths
    relative to dgate_export/, with the packages' __init__.py files: what a model needs of the package."""
    found: set[str] = set()
    todo = [entry]
    while todo:
        rel = todo.pop()
        if rel in found or not (_PACKAGE / rel).is_file():
            continue
        found.add(rel)
        parts = Path(rel).parent.parts
        for i in range(len(parts) + 1):  # every package on the way, top-level included
            todo.append(str(Path(*parts[:i], "__init__.py")))
        for node in ast.walk(ast.parse((_PACKAGE / rel).read_text(encoding="utf-8"))):
            mods: list[tuple[str, ...]] = []
            if isinstance(node, ast.ImportFrom):
                names = node.module.split(".") if node.module else []
                if node.level:
                    mod = (*parts[: len(parts) - node.level + 1], *names)
                elif names[:1] == ["dgate_export"]:
                    mod = tuple(names[1:])
                else:
                    continue
                mods += [mod, *[(*mod, a.name) for a in node.names]]  # `from . import backends` names a module
            elif isinstance(node, ast.Import):
                mods += [tuple(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "dgate_export"]
            for mod in mods:
                if mod:
                    todo += [str(Path(*mod).with_suffix(".py")), str(Path(*mod, "__init__.py"))]
    return sorted(found)


def _vendor(version: Path, entry: str) -> None:
    """Copy the package modules a model's code imports into its version folder (Triton adds nothing of
    this project to the server's Python path; the repository must stand alone)."""
    for rel in package_modules(entry):
        dst = version / "dgate_export" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_PACKAGE / rel, dst)


def _readme(m: Manifest, name: str, platform: str, kind: str, models: list[str], folder: str) -> str:
    c, h, w = (int(d) for d in m.input.shape[1:])
    raw = (f"- `{RAW_INPUT}` UINT8 [N, {c}, {h}, {w}]: raw pixels instead of `input` (normalized as the bundle "
           "records).\n") if m.input.normalization is not None else ""
    backends = {"python": "the Python backend only (each segment model runs its ONNX graph in ONNX Runtime)",
                "onnxruntime": "the Python backend (gate model) and the ONNX Runtime backend",
                "tensorrt": "the Python backend (gate model) and the TensorRT backend"}[platform]
    thr = ", ".join(f"{t:.6g}" for t in m.thresholds)
    return f"""# Triton model repository: {name}

Written by `dgate-export triton` from the bundle `{m.name}` (platform `{platform}`, instances `{kind}`).
It needs a Triton Inference Server with {backends}.

Models: {", ".join(f"`{x}`" for x in models)}.

- `{name}`: the gated network (Python backend, BLS). Send it requests; it runs the segments as other
  models, exits confident samples at each gate and sends the others on.
- `{name}_seg0` .. `{name}_seg{m.num_gates}`: the segments, with dynamic batching: the survivors of
  concurrent requests are merged into one batch at every segment.
- `{name}_baseline`: the un-gated network, with the same batching (the honest comparison).

## Serving it

On a GPU host, NVIDIA's container (its Python backend needs numpy and onnxruntime installed in it for
the `python` platform):

    docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -v $PWD/{folder}:/models \\
        nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository /models

Without a container, `dgate-export serve BUNDLE` writes such a repository and starts a local server on
127.0.0.1 with the `tritonserver` that PyPI's nvidia-pytriton bundles (Python backend only: `--platform
python`); it sets up that server's Python backend (docs/serving.md of dgate-export).

## Request and response (KServe v2, HTTP or gRPC)

Inputs of `{name}`:
- `input` {m.input.dtype} [N, {c}, {h}, {w}]: model input (as `GatedRuntime.run` takes it).
{raw}
Request parameter `{THRESHOLDS_PARAMETER}` (string, optional): {m.num_gates} comma-separated thresholds for
this request; default {thr} (the bundle's).

Outputs: `logits` FP32 [N, {m.num_classes}] (from the exit each sample took), `predictions` INT64 [N],
`exits` INT64 [N] (0..{m.num_gates - 1} a gate, {m.num_gates} the full network), `confidence` FP32 [N].
"""
