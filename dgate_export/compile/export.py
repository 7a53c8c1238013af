"""One ONNX graph per segment of a gated model, and the un-gated baseline.

A segment graph follows docs/architecture.md ("The ONNX contract of a segment"): segment 0 takes
`input`; segment k>0 takes the previous segment's carries as `prev_carry_i` plus `index` and gathers the
rows first (`index_select`, ONNX `Gather` axis 0); gated segments run their head and output the carries,
`logits` and `confidence` (the measure computed in the graph, float32); the last outputs `logits`.

Every batch dimension is dynamic in 1..max_batch and named in the graph: `batch` (the rows a segment
computes) and `rows` (segment k>0's carries, the previous segment's batch). After export the graph's
inputs and outputs are read back and checked against the contract, so an exporter that fixed a batch
dimension or renamed a tensor is caught here, not in the runtime.
"""

from __future__ import annotations

import io
import operator
import re
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import Dim

from ..contract import INPUT, LOGITS, segment_inputs, segment_outputs
from ..errors import UserError
from ..manifest import BATCH, ROWS
from .heads import confidence_torch

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64"}  # onnx.TensorProto elem types the contract uses


class SegmentGraph(nn.Module):
    """What is exported for segment k: [gather] -> segment -> [head -> confidence]."""

    def __init__(self, segment: nn.Module, head: nn.Module | None, confidence: str, gather: bool):
        super().__init__()
        self.segment = segment
        self.head = head
        self.confidence = confidence
        self.gather = gather
        self.hints = _residual_inputs(segment) if gather else set()

    def forward(self, *inputs: torch.Tensor):
        if self.gather:
            *carries, index = inputs
            inputs = tuple(_layout_hint(c.index_select(0, index)) if i in self.hints else c.index_select(0, index)
                           for i, c in enumerate(carries))
        outs = self.segment(*inputs)
        if self.head is None:
            return outs[0]
        logits = self.head(outs[0])
        return (*outs, logits, confidence_torch(self.confidence, logits))


_ADDS = {operator.add, operator.iadd, torch.add}


def _residual_inputs(segment: nn.Module) -> set[int]:
    """Positions of the segment's inputs that feed an addition directly (a residual connection)."""
    if not isinstance(segment, fx.GraphModule):
        return set()
    found = set()
    for i, node in enumerate(n for n in segment.graph.nodes if n.op == "placeholder"):
        if any((u.op == "call_function" and u.target in _ADDS) or (u.op == "call_method" and u.target in ("add", "add_"))
               for u in node.users):
            found.add(i)
    return found


def _layout_hint(x: torch.Tensor) -> torch.Tensor:
    """x through a 1x1 identity convolution (exact: x * 1 + 0s), for 4-D carries that feed a residual Add.

    ONNX Runtime's CPU provider runs convolutions in a blocked layout (NCHWc) and fuses the residual
    Add and ReLU into them, but only when the Add's other input is already blocked. A carry enters a
    segment through the Gather in plain NCHW, so without this every block of the segment converts
    back and forth: in ResNet-56's segment 1, 63 nodes after optimization (8 reorder pairs, 7 Adds,
    7 ReLUs unfused) instead of 36. Measured on the 4-segment chain here: 1.105 -> 0.994 ms at
    batch 1, 177 -> 172 ms at batch 256. The extra convolution is C*C MACs per pixel (0.2% of
    ResNet-56), not counted in FLOPs, like the reorders it removes. Only for carries that feed an Add:
    a DenseNet carry feeds a Concat and gains nothing, while its wide carries made the benchmark
    DenseNet-BC's four segments 11% slower at batch 256 (173 -> 193 ms)."""
    if x.dim() != 4 or not x.is_floating_point():
        return x
    c = int(x.shape[1])  # a constant in the graph: the torchscript exporter would build the eye at run time
    return F.conv2d(x, torch.eye(c, dtype=x.dtype, device=x.device).view(c, c, 1, 1))


class _Baseline(nn.Module):
    """The backbone alone; a wrapper so that a backbone returning a 1-tuple still gives one `logits`."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, *inputs):  # varargs like SegmentGraph, so both take the same dynamic_shapes form
        out = self.backbone(*inputs)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class ExportedGraph:
    path: Path
    inputs: list[dict[str, Any]]  # {"name", "shape", "dtype"} as in the manifest, read from the graph
    outputs: list[dict[str, Any]]
    opset: int
    seconds: float


def segment_graph(model, k: int) -> SegmentGraph:
    """The module exported for segment k of a GatedModel."""
    head = model.heads[k] if k < model.num_gates else None
    return SegmentGraph(model.segments[k], head, model.confidence, gather=k > 0).eval()


def example_inputs(model, k: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Example inputs of segment k's graph from a model input batch `x` (rows R = len(x)).

    The index selects fewer rows than it gathers from, in a non-trivial order, so that the exporter
    sees two unrelated batch sizes and a real gather.
    """
    if k == 0:
        return (x,)
    with torch.no_grad():
        carries: tuple[torch.Tensor, ...] = (x,)
        for segment in model.segments[:k]:
            carries = segment(*carries)
    rows = x.shape[0]
    index = torch.arange(rows - 1, -1, -1, dtype=torch.int64)[: max(1, rows - 1)]
    return (*carries, index)


def export_segment(model, k: int, path: str | Path, *, max_batch: int, opset: int | None = None,
                   exporter: str = DEFAULT_EXPORTER) -> ExportedGraph:
    """Export segment k of GatedModel `model` (in its current dtype) to `path`."""
    x = _example_input(model, max_batch)
    args = example_inputs(model, k, x)
    num_in = 1 if k == 0 else len(args) - 1
    input_names = segment_inputs(k, num_in)
    with torch.no_grad():
        outs = segment_graph(model, k)(*args)
    last = k == model.num_gates
    output_names = segment_outputs(last, 0 if last else len(outs) - 2)
    dims = [BATCH] if k == 0 else [ROWS] * num_in + [BATCH]
    where = f"segment {k}" + (f" (after exit {model.exits[k - 1]!r})" if k > 0 else "")
    return export_module(segment_graph(model, k), args, path, input_names=input_names,
                         output_names=output_names, input_dims=dims, max_batch=max_batch, opset=opset,
                         exporter=exporter, where=where)


def export_baseline(model, path: str | Path, *, max_batch: int, opset: int | None = None,
                    exporter: str = DEFAULT_EXPORTER) -> ExportedGraph:
    """Export the un-gated backbone: `input` -> `logits`."""
    x = _example_input(model, max_batch)
    return export_module(_Baseline(model.backbone).eval(), (x,), path, input_names=[INPUT],
                         output_names=[LOGITS], input_dims=[BATCH], max_batch=max_batch, opset=opset,
                         exporter=exporter, where="the baseline")


def _example_input(model, max_batch: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    # Batch sizes 0 and 1 are special to torch.export; 3 rows keep the example general where allowed.
    rows = min(3, max(2, max_batch))
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, *model.input_shape, generator=generator).to(dtype)


def export_module(module: nn.Module, args: tuple[torch.Tensor, ...], path: str | Path, *,
                  input_names: list[str], output_names: list[str], input_dims: list[str], max_batch: int,
                  opset: int | None, exporter: str, where: str) -> ExportedGraph:
    """Export `module(*args)` with dim 0 of input i dynamic under the name input_dims[i]."""
    if exporter not in EXPORTERS:
        raise UserError(f"Unknown exporter {exporter!r}.", f"Choose one of: {', '.join(EXPORTERS)}.")
    path = Path(path)
    start = time.perf_counter()
    chatter = io.StringIO()  # the exporters print progress and advice; keep the build's output readable
    try:
        with warnings.catch_warnings(), redirect_stdout(chatter), redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                _export_dynamo(module, args, path, input_names, output_names, input_dims, max_batch, opset)
            else:
                _export_torchscript(module, args, path, input_names, output_names, input_dims, opset)
    except UserError:
        raise
    except Exception as err:  # the exporters raise many types; all mean "this module did not export"
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise UserError(
            f"Step export: {where} could not be exported to ONNX by the {exporter} exporter "
            f"({_first_line(err)}).",
            f"Try `--exporter {other}` or another `--opset`; if an operation in this part of the network "
            "has no ONNX equivalent, replace it or move the gate so that it is not needed; `--debug` shows "
            "the full traceback.",
        ) from err
    seconds = time.perf_counter() - start
    _unshadow(path)
    inputs, outputs, graph_opset = read_io(path)
    if any(isinstance(d, str) for t in inputs + outputs for d in t["shape"][1:]):
        _pin_sample_dims(module, args, path)
        inputs, outputs, graph_opset = read_io(path)
    _check_io(inputs, outputs, input_names, output_names, input_dims, where)
    return ExportedGraph(path, inputs, outputs, graph_opset, seconds)


def _export_dynamo(module, args, path, input_names, output_names, input_dims, max_batch, opset) -> None:
    # torch.export refuses a Dim with min == max; the ONNX graph has no upper bound anyway (backends and
    # the manifest enforce max_batch), so a max batch of 1 is traced with the range 1..2.
    named = {name: Dim(name, min=1, max=max(2, max_batch)) for name in set(input_dims)}
    dynamic = tuple({0: named[d]} for d in input_dims)
    torch.onnx.export(
        module, args, str(path), dynamo=True, external_data=False, input_names=input_names,
        output_names=output_names, dynamic_shapes=(dynamic,), opset_version=opset, verbose=False,
    )


def _export_torchscript(module, args, path, input_names, output_names, input_dims, opset) -> None:
    axes = {name: {0: dim} for name, dim in zip(input_names, input_dims)}
    axes.update({name: {0: BATCH} for name in output_names})
    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    torch.onnx.export(module, args, str(path), dynamo=False, input_names=input_names,
                      output_names=output_names, dynamic_axes=axes, **kwargs)


def _unshadow(path: Path) -> None:
    """Rename every value that reuses the name of a graph input (or initializer), and its later uses: an
    ONNX graph must be in static single assignment form. The dynamo exporter names values after their FX
    nodes, so an `aten.index` (AdaptiveAvgPool2d with uneven bins decomposes into one) gave a value named
    "index", the contract's input of every segment k>0, and the checker refused the graph."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inputs = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    everything = inputs | {name for node in graph.node for name in node.output}
    renamed: dict[str, str] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for i, name in enumerate(node.output):
            if name in inputs:
                k = 1
                while f"{name}_{k}" in everything:
                    k += 1
                renamed[name] = node.output[i] = f"{name}_{k}"
                everything.add(node.output[i])
    if not renamed:
        return
    for value in graph.value_info:  # the shapes of the values renamed (the inputs' are in graph.input)
        value.name = renamed.get(value.name, value.name)
    onnx.save(model, str(path))


def _pin_sample_dims(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> None:
    """Give the graph's inputs and outputs the per-sample sizes torch computes for them where the exporter
    left a symbol: the torchscript exporter loses them after a pad-then-slice (Swin's windows pad to a
    multiple of the window and slice back). A symbol on a per-sample axis is a size that follows from
    the fixed input shape, never the batch: rows differ, per-sample sizes do not (the parity step runs
    the graph and would catch a size that depended on the batch)."""
    with torch.no_grad():
        outs = module(*args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    graph = onnx.load(str(path), load_external_data=False)
    for values, tensors in ((graph.graph.input, args), (graph.graph.output, outs)):
        for value, tensor in zip(values, tensors):
            dims = value.type.tensor_type.shape.dim
            if len(dims) != tensor.dim():
                continue  # not this graph's contract: _check_io reports it
            for axis in range(1, tensor.dim()):
                if dims[axis].dim_param:
                    dims[axis].dim_value = int(tensor.shape[axis])  # clears dim_param (a oneof)
    onnx.save(graph, str(path))


def read_io(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """The graph's inputs and outputs as manifest tensor entries, and its default-domain opset."""
    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in tensor.shape.dim]
        return {"name": value.name, "shape": shape, "dtype": _ONNX_DTYPES.get(tensor.elem_type,
                                                                               f"onnx:{tensor.elem_type}")}

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output], int(opset)


def _check_io(inputs, outputs, input_names, output_names, input_dims, where) -> None:
    """The exported graph must have the contract's names, dynamic dims and dtypes."""
    problems = []
    if [t["name"] for t in inputs] != input_names:
        problems.append(f"inputs are {[t['name'] for t in inputs]}, expected {input_names}")
    if [t["name"] for t in outputs] != output_names:
        problems.append(f"outputs are {[t['name'] for t in outputs]}, expected {output_names}")
    for t, dim in zip(inputs, input_dims):
        if not t["shape"] or t["shape"][0] != dim:
            problems.append(f"input {t['name']} has shape {t['shape']}, expected a leading dynamic {dim!r}")
    for t in outputs:
        if not t["shape"] or t["shape"][0] != BATCH:
            problems.append(f"output {t['name']} has shape {t['shape']}, expected a leading dynamic {BATCH!r}")
    for t in inputs + outputs:
        if any(isinstance(d, str) for d in t["shape"][1:]) or any(d == 0 for d in t["shape"]):
            problems.append(f"{t['name']} has shape {t['shape']}: only the leading dimension may be dynamic")
        if t["dtype"].startswith("onnx:"):
            problems.append(f"{t['name']} has an unsupported element type ({t['dtype']})")
    if problems:
        raise UserError(
            f"Step export: the graph of {where} does not follow the segment contract: {'; '.join(problems)}.",
            "The network probably fixes the batch size somewhere (e.g. x.view(3, -1) instead of "
            "x.flatten(1)); make it batch-independent, or try the other `--exporter`.",
        )


def _first_line(err: BaseException) -> str:
    """The root cause's first line: the exporters wrap the real reason in generic "step n/3" errors."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # the exporters colour their messages
    line = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {line}" if line else type(err).__name__
