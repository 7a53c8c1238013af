"""`build --precision int8`: ONNX Runtime static quantization (QDQ) of the exported float graphs.

The build's `quantize` step, run after the float graphs passed parity with the torch model:

1. Rows. `rows` seeded rows of the TRAINING split of `--calibration-data`, cut with the validation
   size and seed the checkpoint records: never a validation row (where the thresholds are fitted) and
   never a test row; prepared as the checkpoint records (normalization, image preparation) and read
   alone (data.Rows), not the whole data set. Rows with NaN or inf, a wrong per-sample shape, or fewer
   rows than asked are refused (UserError) in the build's load step, before any export.
2. Inputs per graph. Segment 0 and the baseline take the rows. Segment k>0 takes the carries the
   float chain produces for them with index = arange (nobody leaves), so every segment's activation
   ranges come from all calibration rows, as in the float bundle when every threshold is off.
3. `onnxruntime.quantization.quantize_static` per graph: QDQ format, weights int8 symmetric per output
   channel, activations per tensor from their min/max over the rows. Activations are uint8 with a zero
   point for ONNX Runtime (its CPU kernels for uint8 x int8 are the fast ones: int8 x int8 QDQ graphs
   ran 1.3-1.7x SLOWER than fp32 here, uint8 ones 1.4-2.8x faster) and int8 symmetric for TensorRT
   (its explicit quantization takes only zero points of 0). What stays float, measured on the
   benchmark ResNet-56 (docs/precision.md): the gate head and the confidence computation (quantizing
   them tripled the logit error, 0.015 -> 0.05 relative, for no speed), and the first convolution
   (one input channel: int8 gains nothing there and costs accuracy).
4. Check. The int8 graphs against the float graphs (which matched torch within 1e-4) on probe rows:
   training rows not used for calibration. `INT8_TOLERANCE` states the bounds; a segment out of
   bounds fails the build with a UserError.
5. Thresholds. Fitted on the int8 bundle's own confidences on the validation split by
   `calibrate --engine`'s recalibrate, on the finished bundle before it is renamed into place
   (`refit_thresholds`), so the accuracy promise is about what runs.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from ..calibrate import Target, exits_of, recorded_target
from ..contract import CARRY_IN_PREFIX, CONFIDENCE, INDEX, INPUT, LOGITS, is_carry
from ..data import DEFAULT_VAL_SIZE, Rows, open_for_model
from ..errors import UserError
from ..recalibrate import recalibrate
from .parity import probe_thresholds, rel_error

CALIBRATION_ROWS = 512  # default --calibration-rows
MIN_CALIBRATION_ROWS = 32  # fewer rows give activation ranges that new data overflows
PROBE_ROWS = 256  # rows of the int8 check (fewer where the training split holds fewer beyond the calibration rows)
CHUNK = 64  # rows per ONNX Runtime call while collecting inputs and exit logits
ROW_SEED = 0  # seed of the calibration rows' draw from the training split
METHOD = "onnxruntime quantize_static, QDQ, MinMax activation ranges, per-channel weights"


@dataclass(frozen=True)
class Int8Tolerance:
    """Bounds of the int8 check, int8 graphs against the float graphs on the probe rows.

    logit_rel: per exit (every row through every segment), max |int8 - fp32| / max(1, max |fp32|).
    prediction_agreement: per exit, the fraction of rows whose argmax is the same.
    decision_agreement: with the bundle's thresholds and with probe thresholds that split every gate,
    the fraction of rows that leave at the same exit.
    Measured on the benchmark ResNet-56 (2000 test rows): logit error 0.013-0.028, predictions agree on
    99.45-99.8% of rows per exit. A briefly trained small ResNet (tests/test_quantize.py), whose logits
    are often near ties, agreed on 93.8% at one exit: the agreement bounds catch a broken quantization
    (saturated ranges agree on 10-50%), the logit bound (3-5x the benchmark's error) catches drift.
    """

    logit_rel: float = 0.1
    prediction_agreement: float = 0.9
    decision_agreement: float = 0.9


INT8_TOLERANCE = Int8Tolerance()


@dataclass
class CalibrationData:
    """The data `build --precision int8` needs (and an fp16 build that refits its thresholds)."""

    data: str  # --calibration-data: a data set spec (fashion-mnist, npz:PATH, npy:DIR, folder:PATH)
    rows: int = CALIBRATION_ROWS
    data_dir: str | None = None
    repeat_channels: bool = False  # repeat 1-channel data to the model's channel count
    # The refit's threshold target on the int8 / fp16 graphs; None: the target the model records (its gate or
    # calibrate run's), else the default.
    target: Target | None = None


@dataclass
class CalibrationRows:
    x: np.ndarray  # the calibration rows [rows, C, H, W]
    probe: np.ndarray  # rows of the int8 check
    info: dict[str, Any] = field(default_factory=dict)  # what the manifest records


def activation_type(backend: str) -> str:
    """uint8 (asymmetric) activations for ONNX Runtime, int8 symmetric for TensorRT (see the docstring)."""
    return "int8-symmetric" if backend == "tensorrt" else "uint8"


# ------------------------------------------------------------------------------------------ 1. rows


def _split_of(model) -> tuple[int, int]:
    split = model.data_split or {}
    return int(split.get("val_size", DEFAULT_VAL_SIZE)), int(split.get("seed", 0))


def _open(options: CalibrationData, model, split: str) -> Rows:
    """`split` of options.data as Rows prepared as the model records (normalization, image preparation)."""
    val_size, seed = _split_of(model)
    return open_for_model(options.data, (split,), input_shape=model.input_shape, normalization=model.normalization,
                          image=getattr(model, "image", None), where="the model", data_dir=options.data_dir,
                          repeat_channels=options.repeat_channels, val_size=val_size, seed=seed)[split]


def _take(rows: Rows, picked: np.ndarray) -> np.ndarray:
    """The rows `picked` (sorted indices) as one float32 array."""
    parts = [x for x, _ in rows.batches(CHUNK * 4, picked)]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32) if parts else np.empty((0,), np.float32)


def calibration_rows(options: CalibrationData, model) -> CalibrationRows:
    """The calibration and probe rows from the training split of options.data (read only those rows:
    memory grows with --calibration-rows, not with the data); UserError on bad data."""
    rows = options.rows
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < MIN_CALIBRATION_ROWS:
        raise UserError(f"--calibration-rows must be a whole number of at least {MIN_CALIBRATION_ROWS}, got {rows!r}.",
                        f"Pass --calibration-rows {CALIBRATION_ROWS} (the default) or more.")
    val_size, seed = _split_of(model)
    where = f"--calibration-data {options.data} (training split)"
    train = _open(options, model, "train")
    if len(train) < rows:
        raise UserError(f"{where} has {len(train)} rows; --calibration-rows asks for {rows}.",
                        f"Pass --calibration-rows {len(train)} or fewer (at least {MIN_CALIBRATION_ROWS}), or give "
                        "more training data.")
    order = np.random.default_rng(ROW_SEED).permutation(len(train))
    chosen = np.sort(order[:rows])
    x = _take(train, chosen)  # rows with NaN or inf are refused as they are read
    probe_rows = np.sort(order[rows:rows + PROBE_ROWS])
    if len(probe_rows) < MIN_CALIBRATION_ROWS:
        probe = x[:PROBE_ROWS]  # too few rows left beyond the calibration rows: probe on those
        probe_rows = np.array([], dtype=np.int64)
    else:
        probe = _take(train, probe_rows)
    info = {
        "rows": rows,
        "source": {"data": options.data, "split": "train", "val_size": val_size, "seed": seed,
                   "row_seed": ROW_SEED},
        "probe": {"rows": len(probe), "disjoint": bool(len(probe_rows))},
    }
    return CalibrationRows(x, probe, info)


# -------------------------------------------------------------------------------- 2. inputs per graph


def _sessions(paths: list[Path]) -> list[Any]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def _all_rows(sessions: list[Any], x: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Every segment's outputs (carries included) for every row of x: nobody leaves, so each segment takes
    the previous one's carries with the identity index. Not the runtime's loop: no exits, no compaction."""
    outputs: list[dict[str, np.ndarray]] = []
    for k, session in enumerate(sessions):
        feeds = {INPUT: x} if k == 0 else _next_feeds(outputs[-1], len(x))
        names = [o.name for o in session.get_outputs()]
        outputs.append(dict(zip(names, session.run(names, feeds))))
    return outputs


def _next_feeds(out: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    feed = {CARRY_IN_PREFIX + name: value for name, value in out.items() if is_carry(name)}
    feed[INDEX] = np.arange(rows, dtype=np.int64)
    return feed


def every_exit(sessions: list[Any], x: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Every segment's outputs for every row of x (nobody leaves), in chunks of CHUNK rows."""
    parts = [_all_rows(sessions, x[rows]) for rows in _chunks(len(x))]
    return [{name: np.concatenate([p[k][name] for p in parts]) for name in parts[0][k]} for k in range(len(sessions))]


def segment_feeds(outputs: list[dict[str, np.ndarray]], x: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Each segment's inputs when every row reaches it: x for segment 0, then the previous carries."""
    return [{INPUT: x}] + [_next_feeds(out, len(x)) for out in outputs[:-1]]


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over one graph's feeds, CHUNK rows a call
    (the index is re-based to each chunk's rows)."""

    def __init__(self, feeds: dict[str, np.ndarray]):
        self.feeds = feeds
        self.n = len(next(v for k, v in feeds.items() if k != INDEX))
        self.slices = _chunks(self.n)

    def get_next(self) -> dict[str, np.ndarray] | None:
        rows = next(self.slices, None)
        if rows is None:
            return None
        return {k: (np.arange(rows.stop - rows.start, dtype=np.int64) if k == INDEX else v[rows])
                for k, v in self.feeds.items()}

    def rewind(self) -> None:
        self.slices = _chunks(self.n)


# ---------------------------------------------------------------------------------- 3. what stays float


def _producers(graph) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def _ancestors(graph, tensors: list[str]) -> set[str]:
    """Names of the nodes that `tensors` depend on."""
    producers = _producers(graph)
    seen: set[str] = set()
    stack = list(tensors)
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def float_nodes(model_proto, *, first_graph: bool) -> dict[str, list[str]]:
    """Nodes left in float, by reason: the gate head and confidence (nodes that only logits and
    confidence depend on, in a graph with carries), and the first convolution of a graph that takes
    `input` (segment 0, the baseline)."""
    graph = model_proto.graph
    outputs = [o.name for o in graph.output]
    carries = [o for o in outputs if is_carry(o)]
    keep: dict[str, list[str]] = {}
    if carries:
        head = _ancestors(graph, [o for o in outputs if o not in carries]) - _ancestors(graph, carries)
        keep["gate head and confidence"] = [n.name for n in graph.node if n.name in head]
    if first_graph:
        first = next((n for n in graph.node if n.op_type == "Conv"), None)
        if first is not None:
            keep["first convolution"] = [first.name]
    return keep


# ------------------------------------------------------------------------------------------ quantize


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """quantize_static logs advice (pre-processing) through the root logger on every call."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _name_nodes(model_proto) -> None:
    """nodes_to_exclude works by node name; the exporters leave a few nodes unnamed."""
    taken = {n.name for n in model_proto.graph.node if n.name}
    for i, node in enumerate(model_proto.graph.node):
        if not node.name:
            name = f"dgate_node_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def quantize_graph(path: Path, feeds: dict[str, np.ndarray], *, backend: str, first_graph: bool) -> dict[str, Any]:
    """Replace the float graph at `path` by its QDQ int8 version; return what stayed float."""
    model_proto = onnx.load(str(path))
    _name_nodes(model_proto)
    keep = float_nodes(model_proto, first_graph=first_graph)
    symmetric = activation_type(backend) == "int8-symmetric"
    tmp = path.with_name(path.stem + ".int8.onnx")
    try:
        with _quiet_quantizer():
            quantize_static(
                model_proto, tmp, _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=[name for names in keep.values() for name in names],
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    quantized = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in quantized.graph.node]
    return {"float_nodes": {reason: len(names) for reason, names in keep.items()},
            "quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear")}


# ------------------------------------------------------------------------------------------ 4. check


@dataclass
class Int8Report:
    tolerance: Int8Tolerance
    probe_rows: int
    logit_errors: list[float]  # per exit, all rows through all segments, relative to the float graphs
    prediction_agreement: list[float]  # per exit
    confidence_errors: list[float]  # per gate, absolute
    baseline_error: float
    baseline_agreement: float
    decision_agreement: dict[str, float]  # thresholds' name -> fraction of rows leaving at the same exit

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": {"logit_rel": self.tolerance.logit_rel,
                              "prediction_agreement": self.tolerance.prediction_agreement,
                              "decision_agreement": self.tolerance.decision_agreement},
                "against": "the float graphs (which matched torch within the fp32 tolerance)",
                "probe_rows": self.probe_rows, "logit_errors": self.logit_errors,
                "prediction_agreement": self.prediction_agreement, "confidence_errors": self.confidence_errors,
                "baseline_error": self.baseline_error, "baseline_agreement": self.baseline_agreement,
                "decision_agreement": self.decision_agreement}

    def summary(self) -> str:
        worst = max(self.logit_errors + [self.baseline_error])
        agree = min(self.prediction_agreement + [self.baseline_agreement])
        return (f"{self.probe_rows} probe rows; vs fp32 graphs: logit error <= {worst:.3f} (bound "
                f"{self.tolerance.logit_rel:g}), predictions agree >= {agree:.1%}, exit decisions agree >= "
                f"{min(self.decision_agreement.values()):.1%}")


def check_int8(float_paths: list[Path], int8_paths: list[Path], probe: np.ndarray, thresholds: list[float],
               tol: Int8Tolerance | None = None) -> Int8Report:
    """Compare the int8 graphs (segments, then the baseline) with the float ones; UserError when out of bounds."""
    tol = tol or INT8_TOLERANCE
    num_gates = len(float_paths) - 2
    f_sessions, q_sessions = _sessions(float_paths[:-1]), _sessions(int8_paths[:-1])
    f_out, q_out = every_exit(f_sessions, probe), every_exit(q_sessions, probe)

    def fail(what: str) -> UserError:
        return UserError(
            f"Step quantize: {what}",
            "int8 changes this network more than the bounds allow (docs/precision.md). Check that "
            "--calibration-data is the data the model was trained on, try more --calibration-rows, or build "
            "--precision fp16 or fp32.")

    errors, agreement, conf_errors = [], [], []
    for k in range(num_gates + 1):
        ref, got = f_out[k][LOGITS], q_out[k][LOGITS]
        errors.append(rel_error(got, ref))
        agreement.append(float((got.argmax(1) == ref.argmax(1)).mean()))
        where = f"segment {k}" + (f" (exit {k})" if k < num_gates else " (the final exit)")
        if errors[-1] > tol.logit_rel:
            raise fail(f"{where}: int8 logits differ from the fp32 graph's by {errors[-1]:.3f} (relative to "
                       f"max(1, max |logits|)), more than {tol.logit_rel:g}, on {len(probe)} probe rows.")
        if agreement[-1] < tol.prediction_agreement:
            raise fail(f"{where}: int8 predictions equal the fp32 graph's on {agreement[-1]:.1%} of {len(probe)} "
                       f"probe rows, fewer than {tol.prediction_agreement:.0%}.")
        if k < num_gates:
            conf_errors.append(float(np.abs(q_out[k][CONFIDENCE] - f_out[k][CONFIDENCE]).max()))
    f_base, q_base = _sessions(float_paths[-1:])[0], _sessions(int8_paths[-1:])[0]
    ref = np.concatenate([f_base.run([LOGITS], {INPUT: probe[r]})[0] for r in _chunks(len(probe))])
    got = np.concatenate([q_base.run([LOGITS], {INPUT: probe[r]})[0] for r in _chunks(len(probe))])
    base_error, base_agreement = rel_error(got, ref), float((got.argmax(1) == ref.argmax(1)).mean())
    if base_error > tol.logit_rel or base_agreement < tol.prediction_agreement:
        raise fail(f"baseline.onnx: int8 logits differ from the fp32 graph's by {base_error:.3f} (bound "
                   f"{tol.logit_rel:g}); predictions agree on {base_agreement:.1%} (bound "
                   f"{tol.prediction_agreement:.0%}).")
    decisions = {}
    for name, thr in (("bundle thresholds", thresholds),
                      ("probe thresholds", probe_thresholds([o[CONFIDENCE] for o in f_out[:-1]]))):
        # every gate's confidence of every row is known: the exit is the first gate it passes (rows are
        # independent, so this is what the compacting runtime decides)
        f_exits = exits_of(np.stack([o[CONFIDENCE] for o in f_out[:-1]]), thr)
        q_exits = exits_of(np.stack([o[CONFIDENCE] for o in q_out[:-1]]), thr)
        decisions[name] = float((f_exits == q_exits).mean())
        if decisions[name] < tol.decision_agreement:
            raise fail(f"with the {name} {[round(t, 4) for t in thr]}, {decisions[name]:.1%} of {len(probe)} probe "
                       f"rows leave at the same exit in the int8 and the fp32 graphs, fewer than "
                       f"{tol.decision_agreement:.0%}.")
    return Int8Report(tol, len(probe), errors, agreement, conf_errors, base_error, base_agreement, decisions)


# ------------------------------------------------------------------------------------- 5. thresholds


def refit_thresholds(bundle: Path, model, options: CalibrationData) -> Any:
    """Fit the thresholds of the (complete, not yet renamed) int8 / fp16 bundle to its own confidences on
    the validation split the model records, for options.target: `calibrate --engine`'s recalibrate,
    which rewrites the manifest's thresholds and its `calibration` record (a holdout keeps the same rows
    out as `calibrate --holdout`)."""
    val_size, seed = _split_of(model)
    val = _open(options, model, "val")
    record = {"spec": options.data, "val_size": val_size, "seed": seed, "rows": len(val)}
    return recalibrate(bundle, val, None, target=refit_target(model, options), seed=seed,
                       data_record=record).calibration


def refit_target(model, options: CalibrationData) -> Target:
    """The refit's target: the options' own, else the one the model was calibrated for (recorded by gate /
    calibrate), else the default (checkpoints written before targets were recorded)."""
    return options.target if options.target is not None else recorded_target(model.calibration)


# --------------------------------------------------------------------------------------- the step


def quantize_bundle(model, segment_paths: list[Path], baseline_path: Path, options: CalibrationData,
                    data: CalibrationRows, *, backend: str, progress: Callable[[str], Any] = print) -> dict[str, Any]:
    """Steps 2-4 on the float graphs in place (step 1, `calibration_rows`, ran before the export; step 5,
    `refit_thresholds`, runs on the finished bundle); return the manifest's `quantization` record."""
    paths = [*segment_paths, baseline_path]
    with tempfile.TemporaryDirectory(prefix="dgate-int8-", dir=baseline_path.parent) as tmp:
        floats = [Path(tmp) / p.name for p in paths]  # the float graphs, kept for the check
        for src, dst in zip(paths, floats):
            shutil.copyfile(src, dst)
        outputs = every_exit(_sessions(floats[:-1]), data.x)
        feeds = [*segment_feeds(outputs, data.x), {INPUT: data.x}]
        graphs = {}
        for k, (path, feed) in enumerate(zip(paths, feeds)):
            graphs[path.name] = quantize_graph(path, feed, backend=backend,
                                               first_graph=k == 0 or path == baseline_path)
            progress(f"        {path.name}: int8, {graphs[path.name]['quantize_linear']} QuantizeLinear, "
                     f"float: {graphs[path.name]['float_nodes'] or 'nothing'}")
        fp32_thresholds = [float(t) for t in model.thresholds]
        report = check_int8(floats, paths, data.probe, fp32_thresholds)
        progress(f"        check: {report.summary()}")
    return {
        "method": METHOD,
        "weights": "int8, symmetric, per output channel",
        "activations": activation_type(backend) + ", per tensor",
        "calibration": {**data.info, "inputs": "segment k>0: the float chain's carries for the calibration "
                                               "rows, every row reaching every segment"},
        "graphs": graphs,
        "check": report.to_dict(),
        "thresholds": {"fitted_on": "the int8 graphs' confidences, validation split (the manifest's calibration "
                                    "record)", "fp32_thresholds": fp32_thresholds},
    }
