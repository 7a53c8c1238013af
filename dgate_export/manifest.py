"""The bundle's `manifest.json`: write, read, validate, verify (the contract between build and run).

The format is documented field by field in docs/manifest.md; this module is its executable form. It
imports neither torch nor onnx: the runtime and `inspect` read bundles with it on machines that have only
numpy and a backend library.

`load_manifest(dir)` refuses anything that a runtime could misread: an unknown "format", missing or
ill-typed fields, segments whose tensors do not chain, file names that leave the bundle directory.
`verify_bundle(dir)` also checks every artifact's sha256.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import contract
from .contract import CARRY_IN_PREFIX, CONFIDENCE, CONFIDENCES, INDEX, INPUT, LOGITS
from .errors import UserError
from .files import sha256_file, write_text_atomic
from .images import ImagePrep

FORMAT = "dgate-bundle/1"
# /1 plus input.image (how image files become input): written only by bundles that record it, so that
# readers of /1 keep reading every other bundle, and refuse the ones whose images they would misprepare.
FORMAT_IMAGES = "dgate-bundle/2"
FORMATS = (FORMAT, FORMAT_IMAGES)
MANIFEST_FILE = "manifest.json"
# precision -> float dtype of every graph's inputs and outputs (int8 graphs quantize inside: QDQ)
PRECISIONS = {"fp32": "float32", "fp16": "float16", "int8": "float32"}
DTYPES = ("float32", "float16", "int64")
BATCH = "batch"  # symbolic dim: the rows this segment computes (dynamic, 1..max_batch)
ROWS = "rows"  # symbolic dim of segment k>0's carries: the previous segment's batch (1..max_batch)

_REBUILD_HINT = (
    "The bundle was written by another version of dgate-export or edited by hand; "
    "rebuild it with `dgate-export build`."
)


# ---------------------------------------------------------------------------------------------- types


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]  # ints are fixed sizes; "batch" / "rows" are dynamic (1..max_batch)
    dtype: str  # "float32" | "float16" | "int64"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class Gate:
    exit: str  # backbone module whose output feeds the head (carry_0)
    threshold: float  # a sample leaves when confidence >= threshold
    head: str  # head name in the gates registry ("linear", "mlp", "grid")
    head_flops: int | None = None  # FLOPs per sample of the head (2 x MACs)

    def to_dict(self) -> dict[str, Any]:
        return {"exit": self.exit, "threshold": self.threshold, "head": self.head,
                "head_flops": self.head_flops}


@dataclass
class Segment:
    index: int
    file: str  # the segment's ONNX graph
    sha256: str
    engine: dict[str, Any]  # what the backend runs: {"file", "sha256", ...backend extras}
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    flops: int | None = None  # FLOPs per sample of the backbone part (head excluded)
    gate: Gate | None = None  # None for the last segment only

    @property
    def carries(self) -> list[str]:
        """Names of the outputs the next segment takes (carry_0 first: the gate's features)."""
        return [t.name for t in self.outputs if contract.is_carry(t.name)]

    @property
    def carry_inputs(self) -> list[tuple[str, str]]:
        """(input name, previous segment's output name) for each carry this segment takes."""
        return contract.carry_links(self.input_names)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, **_graph_fields(self), "gate": self.gate.to_dict() if self.gate else None}


@dataclass
class Baseline:
    file: str
    sha256: str
    engine: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    flops: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return _graph_fields(self)


def _graph_fields(graph: Segment | Baseline) -> dict[str, Any]:
    """The fields every graph entry (segment or baseline) writes, in the documented order."""
    return {
        "file": graph.file,
        "sha256": graph.sha256,
        "engine": dict(graph.engine),
        "inputs": [t.to_dict() for t in graph.inputs],
        "outputs": [t.to_dict() for t in graph.outputs],
        "flops": graph.flops,
    }


@dataclass
class InputSpec:
    name: str
    shape: list[int | str]  # ["batch", C, H, W]
    dtype: str
    layout: str = "NCHW"
    normalization: dict[str, Any] | None = None  # {"scale", "mean": [...], "std": [...]}: x = (raw*scale - mean)/std
    image: ImagePrep | None = None  # how an image file becomes raw pixels (format /2 only), None: no record

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "layout": self.layout,
               "normalization": self.normalization}
        if self.image is not None:
            out["image"] = self.image.to_dict()
        return out


@dataclass
class Manifest:
    name: str
    created: str
    backend: str
    precision: str
    max_batch: int
    input: InputSpec
    num_classes: int
    class_names: list[str] | None
    confidence: str
    segments: list[Segment]
    baseline: Baseline
    tools: dict[str, str] = field(default_factory=dict)
    backend_info: dict[str, Any] = field(default_factory=dict)
    opset: int | None = None
    source: dict[str, Any] | None = None  # where the bundle came from: checkpoint file, sha256, arch
    calibration: dict[str, Any] | None = None  # how `calibrate --engine` chose the thresholds (None: from source)
    quantization: dict[str, Any] | None = None  # int8: how it was calibrated and checked (docs/precision.md)
    # The exit mix the thresholds gave on the calibration rows (`drift`'s reference): exit_fractions, rows,
    # thresholds, on, by (docs/manifest.md)
    exit_reference: dict[str, Any] | None = None
    format: str = FORMAT
    root: Path | None = field(default=None, compare=False)  # the bundle directory once loaded; not written

    @property
    def num_gates(self) -> int:
        return len(self.segments) - 1

    @property
    def thresholds(self) -> list[float]:
        return [s.gate.threshold for s in self.segments if s.gate is not None]

    def exit_costs(self) -> list[float]:
        """FLOPs per sample of leaving at exit k (segments 0..k plus heads 0..k); UserError when the
        bundle records no FLOPs."""
        if any(s.flops is None for s in self.segments):
            raise UserError("This bundle records no FLOPs per segment.", "Rebuild it with `dgate-export build`.")
        return contract.exit_costs([s.flops or 0 for s in self.segments],
                                   [s.gate.head_flops or 0 for s in self.segments if s.gate is not None])

    def path(self, file: str) -> Path:
        """Absolute path of a bundle file named in this manifest."""
        if self.root is None:
            raise ValueError("this manifest was not loaded from a bundle directory")
        return self.root / file

    def to_dict(self) -> dict[str, Any]:
        extra = {"quantization": self.quantization} if self.quantization is not None else {}
        return {
            "format": FORMAT_IMAGES if self.input.image is not None else FORMAT,
            "name": self.name,
            "created": self.created,
            "backend": self.backend,
            "precision": self.precision,
            "max_batch": self.max_batch,
            "opset": self.opset,
            "input": self.input.to_dict(),
            "classes": {"count": self.num_classes, "names": self.class_names},
            "confidence": self.confidence,
            "segments": [s.to_dict() for s in self.segments],
            "baseline": self.baseline.to_dict(),
            "source": self.source,
            "tools": dict(self.tools),
            "backend_info": dict(self.backend_info),
            **({"calibration": self.calibration} if self.calibration is not None else {}),
            **extra,
            **({"exit_reference": self.exit_reference} if self.exit_reference is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Parse and validate; raise UserError naming the first bad field."""
        return _parse(data, where)


# ------------------------------------------------------------------------------------------- read/write


def write_manifest(bundle_dir: str | Path, manifest: Manifest, *, expect_sha256: str | None = None) -> Path:
    """Validate `manifest` and write it as `bundle_dir/manifest.json` atomically (temp file, rename).
    `expect_sha256`: the sha256 of the manifest the caller read; a manifest rewritten since is not
    overwritten (UserError; files.atomic_write)."""
    bundle_dir = Path(bundle_dir)
    data = manifest.to_dict()
    _parse(data, "manifest to write")  # never write what load_manifest would refuse
    return write_text_atomic(bundle_dir / MANIFEST_FILE, json.dumps(data, indent=2, allow_nan=False) + "\n",
                             expect_sha256=expect_sha256)


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate a bundle's manifest (`bundle_dir` or its manifest.json). Hashes are not checked."""
    bundle_dir = Path(bundle_dir)
    if bundle_dir.is_file() and bundle_dir.name == MANIFEST_FILE:
        bundle_dir = bundle_dir.parent
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise UserError(f"{bundle_dir} is not a bundle directory (it does not exist or is a file).",
                        "Pass the directory written by `dgate-export build`, e.g. engines/NAME.")
    if not path.is_file():
        raise UserError(f"{bundle_dir} has no {MANIFEST_FILE}, so it is not a dgate-export bundle.",
                        "Pass the directory written by `dgate-export build`, e.g. engines/NAME.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}).", _REBUILD_HINT) from err
    manifest = _parse(data, str(path))
    manifest.root = bundle_dir.resolve()
    return manifest


# ----------------------------------------------------------------------------------------------- hashes


@dataclass
class FileCheck:
    file: str
    expected: str
    status: str  # "ok" | "missing" | "mismatch"
    size: int | None = None


def bundle_files(manifest: Manifest) -> dict[str, str]:
    """Every artifact the manifest names, file -> sha256 (the ONNX graphs and the backend's engines)."""
    files: dict[str, str] = {}
    entries: list[tuple[str, str]] = []
    for s in manifest.segments:
        entries += [(s.file, s.sha256), (s.engine["file"], s.engine["sha256"])]
    b = manifest.baseline
    entries += [(b.file, b.sha256), (b.engine["file"], b.engine["sha256"])]
    for name, digest in entries:
        if files.setdefault(name, digest) != digest:
            raise UserError(f"manifest.json names {name} twice with different sha256.", _REBUILD_HINT)
    return files


def check_files(manifest: Manifest, bundle_dir: str | Path | None = None) -> list[FileCheck]:
    """Hash every artifact of the bundle and compare with the manifest."""
    root = Path(bundle_dir) if bundle_dir is not None else manifest.root
    if root is None:
        raise ValueError("check_files needs the bundle directory")
    checks = []
    for name, expected in bundle_files(manifest).items():
        path = root / name
        if not path.is_file():
            checks.append(FileCheck(name, expected, "missing"))
            continue
        actual = sha256_file(path)
        checks.append(FileCheck(name, expected, "ok" if actual == expected else "mismatch",
                                path.stat().st_size))
    return checks


def verify_bundle(bundle_dir: str | Path) -> Manifest:
    """Load the manifest and check every artifact's sha256; raise UserError on any missing or changed file."""
    manifest = load_manifest(bundle_dir)
    raise_if_damaged(bundle_dir, check_files(manifest))
    return manifest


def raise_if_damaged(bundle_dir: str | Path, checks: list[FileCheck]) -> None:
    """UserError naming every artifact that is missing or whose sha256 differs from the manifest's."""
    bad = [c for c in checks if c.status != "ok"]
    if bad:
        listing = ", ".join(f"{c.file} ({c.status})" for c in bad)
        raise UserError(
            f"The bundle {bundle_dir} is damaged: {listing} "
            "(the sha256 recorded in manifest.json does not match the file on disk).",
            "Rebuild the bundle with `dgate-export build ... --force`; do not edit its files by hand.",
        )


# ---------------------------------------------------------------------------------------------- parsing


class _Bad(Exception):
    """Internal: a validation failure at a JSON path; converted to UserError by _parse."""


def _parse(data: Any, where: str) -> Manifest:
    try:
        return _parse_manifest(data)
    except _Bad as err:
        raise UserError(f"{where}: {err}.", _REBUILD_HINT) from None


def _get(d: Any, key: str, at: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    if not isinstance(d, dict):
        raise _Bad(f"{at} must be an object")
    if key not in d or (optional and d[key] is None):
        if optional:
            return None
        raise _Bad(f"{at}.{key} is missing")
    value = d[key]
    # bool is an int in Python; a JSON true is never a valid count or size here.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _Bad(f"{at}.{key} must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise _Bad(f"{at}.{key} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
             bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _file_name(d: Any, at: str) -> str:
    name = _get(d, "file", at, str)
    # A manifest must never make a reader touch files outside the bundle directory.
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise _Bad(f"{at}.file {name!r} must be a plain file name inside the bundle directory")
    return name


def _sha(d: Any, at: str) -> str:
    digest = _get(d, "sha256", at, str)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _Bad(f"{at}.sha256 must be 64 lower-case hex digits")
    return digest


def _flops(d: Any, key: str, at: str) -> int | None:
    value = _get(d, key, at, int, optional=True)
    if value is not None and value < 0:
        raise _Bad(f"{at}.{key} must be >= 0")
    return value


def _shape(value: Any, at: str) -> list[int | str]:
    if not isinstance(value, list) or not value:
        raise _Bad(f"{at} must be a non-empty list")
    for i, dim in enumerate(value):
        if isinstance(dim, bool) or not (isinstance(dim, str) and dim in (BATCH, ROWS)
                                         or isinstance(dim, int) and dim >= 1):
            raise _Bad(f"{at}[{i}] must be a positive integer, {BATCH!r} or {ROWS!r}, got {dim!r}")
    return list(value)


def _tensor(d: Any, at: str) -> TensorSpec:
    name = _get(d, "name", at, str)
    dtype = _get(d, "dtype", at, str)
    if dtype not in DTYPES:
        raise _Bad(f"{at}.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return TensorSpec(name, _shape(_get(d, "shape", at, list), f"{at}.shape"), dtype)


def _tensors(d: Any, key: str, at: str) -> list[TensorSpec]:
    items = _get(d, key, at, list)
    specs = [_tensor(t, f"{at}.{key}[{i}]") for i, t in enumerate(items)]
    names = [t.name for t in specs]
    if len(set(names)) != len(names):
        raise _Bad(f"{at}.{key} has duplicate tensor names {names}")
    return specs


def _engine(d: Any, at: str) -> dict[str, Any]:
    engine = _get(d, "engine", at, dict)
    _file_name(engine, f"{at}.engine")
    _sha(engine, f"{at}.engine")
    return dict(engine)


def _parse_manifest(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise _Bad("the top level must be a JSON object")
    fmt = data.get("format")
    if fmt not in FORMATS:
        if isinstance(fmt, str) and fmt.startswith("dgate-bundle/"):
            raise _Bad(f"format {fmt!r} is not supported (this dgate-export reads {' and '.join(map(repr, FORMATS))})")
        raise _Bad(f"format {fmt!r} is not {FORMAT!r}: this is not a dgate-export bundle manifest")

    precision = _get(data, "precision", "manifest", str)
    if precision not in PRECISIONS:
        raise _Bad(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    float_dtype = PRECISIONS[precision]
    max_batch = _get(data, "max_batch", "manifest", int)
    if max_batch < 1:
        raise _Bad("max_batch must be >= 1")
    confidence = _get(data, "confidence", "manifest", str)
    if confidence not in CONFIDENCES:
        raise _Bad(f"confidence {confidence!r} is not one of {', '.join(CONFIDENCES)}")
    opset = _get(data, "opset", "manifest", int, optional=True)

    inp = _get(data, "input", "manifest", dict)
    input_spec = InputSpec(
        name=_get(inp, "name", "input", str),
        shape=_shape(_get(inp, "shape", "input", list), "input.shape"),
        dtype=_get(inp, "dtype", "input", str),
        layout=_get(inp, "layout", "input", str),
        normalization=_normalization(inp.get("normalization")),
        image=_image(_get(inp, "image", "input", dict)) if fmt == FORMAT_IMAGES else None,
    )
    if input_spec.image is not None and [input_spec.image.channels, *input_spec.image.size] != input_spec.shape[1:]:
        raise _Bad(f"input.image (color {input_spec.image.color}, size {list(input_spec.image.size)}) does not give "
                   f"input.shape {input_spec.shape[1:]}")
    if input_spec.name != INPUT or input_spec.dtype != float_dtype or input_spec.shape[0] != BATCH:
        raise _Bad(f"input must be named {INPUT!r}, have dtype {float_dtype} for precision {precision} "
                   f"and a leading {BATCH!r} dimension")

    classes = _get(data, "classes", "manifest", dict)
    num_classes = _get(classes, "count", "classes", int)
    if num_classes < 1:
        raise _Bad("classes.count must be >= 1")
    names = _get(classes, "names", "classes", list, optional=True)
    if names is not None and (len(names) != num_classes or not all(isinstance(n, str) for n in names)):
        raise _Bad(f"classes.names must be {num_classes} strings")

    raw_segments = _get(data, "segments", "manifest", list)
    if not raw_segments:
        raise _Bad("segments is empty")
    segments = [_segment(s, i, len(raw_segments)) for i, s in enumerate(raw_segments)]
    _check_chain(segments, input_spec, num_classes, float_dtype)

    raw_base = _get(data, "baseline", "manifest", dict)
    baseline = Baseline(
        file=_file_name(raw_base, "baseline"),
        sha256=_sha(raw_base, "baseline"),
        engine=_engine(raw_base, "baseline"),
        inputs=_tensors(raw_base, "inputs", "baseline"),
        outputs=_tensors(raw_base, "outputs", "baseline"),
        flops=_flops(raw_base, "flops", "baseline"),
    )
    if [t.name for t in baseline.inputs] != [INPUT] or [t.name for t in baseline.outputs] != [LOGITS]:
        raise _Bad(f"baseline must take {INPUT!r} and output {LOGITS!r}")
    if baseline.inputs[0] != TensorSpec(INPUT, input_spec.shape, input_spec.dtype):
        raise _Bad("baseline.inputs[0] must match input (shape and dtype)")
    _check_logits(baseline.outputs[0], "baseline", num_classes, float_dtype)

    quantization = _get(data, "quantization", "manifest", dict, optional=True)
    if (precision == "int8") != (quantization is not None):
        raise _Bad("quantization (how the int8 graphs were calibrated) must be present exactly when precision is int8")
    tools = _get(data, "tools", "manifest", dict)
    if not all(isinstance(v, str) for v in tools.values()):
        raise _Bad("tools must map tool names to version strings")
    return Manifest(
        name=_get(data, "name", "manifest", str),
        created=_get(data, "created", "manifest", str),
        backend=_get(data, "backend", "manifest", str),
        precision=precision,
        max_batch=max_batch,
        input=input_spec,
        num_classes=num_classes,
        class_names=list(names) if names is not None else None,
        confidence=confidence,
        segments=segments,
        baseline=baseline,
        tools=dict(tools),
        backend_info=dict(_get(data, "backend_info", "manifest", dict)),
        opset=opset,
        source=_get(data, "source", "manifest", dict, optional=True),
        calibration=_get(data, "calibration", "manifest", dict, optional=True),
        quantization=quantization,
        exit_reference=_exit_reference(data, len(segments) - 1),
        format=fmt,
    )


def _exit_reference(data: Any, num_gates: int) -> dict[str, Any] | None:
    ref = _get(data, "exit_reference", "manifest", dict, optional=True)
    if ref is None:
        return None
    fractions = _get(ref, "exit_fractions", "exit_reference", list)
    thresholds = _get(ref, "thresholds", "exit_reference", list)
    rows = _get(ref, "rows", "exit_reference", int)
    numbers = [*fractions, *thresholds]
    if (len(fractions) != num_gates + 1 or len(thresholds) != num_gates or rows < 1
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
            or any(f < 0 for f in fractions)):
        raise _Bad(f"exit_reference must hold {num_gates + 1} exit_fractions >= 0, {num_gates} thresholds and "
                   "rows >= 1")
    return dict(ref)


def _image(value: dict) -> ImagePrep:
    try:
        return ImagePrep.from_dict(value)
    except (ValueError, UserError) as err:
        raise _Bad(str(err)) from err


def _normalization(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    at = "input.normalization"
    scale = _get(value, "scale", at, (int, float))
    mean = _get(value, "mean", at, list)
    std = _get(value, "std", at, list)
    if len(mean) != len(std) or not mean:
        raise _Bad(f"{at}.mean and .std must be non-empty lists of equal length")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*mean, *std]):
        raise _Bad(f"{at}.mean and .std must hold numbers")
    if any(v <= 0 for v in std):
        raise _Bad(f"{at}.std must be > 0")
    return {"scale": scale, "mean": list(mean), "std": list(std)}


def _segment(d: Any, position: int, count: int) -> Segment:
    at = f"segments[{position}]"
    index = _get(d, "index", at, int)
    if index != position:
        raise _Bad(f"{at}.index is {index}; segments must be listed in order 0..{count - 1}")
    raw_gate = _get(d, "gate", at, dict, optional=True)
    last = position == count - 1
    if last and raw_gate is not None:
        raise _Bad(f"{at} is the last segment and must have gate null")
    if not last and raw_gate is None:
        raise _Bad(f"{at}.gate is missing; every segment but the last has a gate")
    gate = None
    if raw_gate is not None:
        threshold = _get(raw_gate, "threshold", f"{at}.gate", (int, float))
        if not math.isfinite(threshold):
            raise _Bad(f"{at}.gate.threshold must be a finite number")
        gate = Gate(
            exit=_get(raw_gate, "exit", f"{at}.gate", str),
            threshold=float(threshold),
            head=_get(raw_gate, "head", f"{at}.gate", str),
            head_flops=_flops(raw_gate, "head_flops", f"{at}.gate"),
        )
    return Segment(
        index=index,
        file=_file_name(d, at),
        sha256=_sha(d, at),
        engine=_engine(d, at),
        inputs=_tensors(d, "inputs", at),
        outputs=_tensors(d, "outputs", at),
        flops=_flops(d, "flops", at),
        gate=gate,
    )


def _check_logits(spec: TensorSpec, at: str, num_classes: int, float_dtype: str) -> None:
    if spec.shape != [BATCH, num_classes] or spec.dtype != float_dtype:
        raise _Bad(f"{at} output 'logits' must be {float_dtype} [{BATCH!r}, {num_classes}], "
                   f"got {spec.dtype} {spec.shape}")


def _check_chain(segments: list[Segment], input_spec: InputSpec, num_classes: int, float_dtype: str) -> None:
    """The segments' tensors must chain as docs/architecture.md's ONNX contract says."""
    for seg in segments:
        at = f"segments[{seg.index}]"
        last = seg.gate is None
        outs = {t.name: t for t in seg.outputs}
        carries = seg.carries
        expected_tail = contract.segment_outputs(last, 0)
        if seg.output_names != carries + expected_tail or (not last and not carries):
            raise _Bad(f"{at}.outputs must be carry_0..carry_m-1 then {expected_tail} "
                       f"({'no carries' if last else 'at least one carry'}), got {seg.output_names}")
        if carries != [contract.carry(i) for i in range(len(carries))]:
            raise _Bad(f"{at}.outputs: carries must be named carry_0, carry_1, ... in order")
        _check_logits(outs[LOGITS], f"{at}", num_classes, float_dtype)
        # confidence is float32 in every bundle: fp16 cannot resolve thresholds near 1 (spacing 0.0005).
        if not last and (outs[CONFIDENCE].shape != [BATCH] or outs[CONFIDENCE].dtype != "float32"):
            raise _Bad(f"{at} output 'confidence' must be float32 [{BATCH!r}] (also in fp16 bundles)")
        for name in carries:
            t = outs[name]
            if t.shape[0] != BATCH or t.dtype != float_dtype:
                raise _Bad(f"{at} output {name} must be {float_dtype} with a leading {BATCH!r} dimension")

        if seg.index == 0:
            want = [TensorSpec(INPUT, input_spec.shape, input_spec.dtype)]
            if seg.inputs != want:
                raise _Bad(f"{at}.inputs must be exactly the bundle's input {want[0].to_dict()}")
            continue
        prev = segments[seg.index - 1]
        want = [TensorSpec(CARRY_IN_PREFIX + t.name, [ROWS, *t.shape[1:]], t.dtype) for t in prev.outputs
                if contract.is_carry(t.name)]
        want.append(TensorSpec(INDEX, [BATCH], "int64"))
        if seg.inputs != want:
            raise _Bad(f"{at}.inputs must be the previous segment's carries renamed prev_carry_i (leading dim {ROWS!r}) and "
                       f"'index' int64 [{BATCH!r}]: expected {[t.to_dict() for t in want]}")
