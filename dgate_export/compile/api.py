"""The Python API of the compile side: a user's own model and data, in a few calls (docs/python-api.md).

    gated = attach_gates(net, ["layer1", "layer2"], data=train)        # d-gates at named module outputs
    train_gates(gated, train)                                          # backbone frozen, cached features
    result = calibrate_gates(gated, val, test=test, target=Target(max_drop=0.01))
    save_model(gated, "model.pt", calibration=result)                  # model.pt + its curve
    build_bundle(gated, "engines/mine")                                # ONNX per segment, checked
    bench_bundle("engines/mine", test, batch_sizes=(1, 64))            # vs the un-gated baseline

Data, wherever a function takes some: a data set spec ("fashion-mnist", "npz:PATH", "npy:DIR",
"folder:PATH": the split each step uses, the validation split recorded in the model, prepared as the
model records: data.open_for_model), a `data.Rows`, `(x, y)` arrays, a torch
`Dataset`, a `DataLoader` or an iterable of `(x, y)` batches (`torch_data.as_rows`). The CLI's `gate`
and `calibrate` commands are these functions (compile/gate.py calls them); `build` is `build_bundle`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bench import BenchOptions, run_bench
from ..calibrate import (
    Calibration,
    Evaluation,
    Target,
    calibrate,
    calibration_record,
    evaluate,
    holdout_rows,
    save_curve,
)
from ..contract import DEFAULT_CONFIDENCE
from ..data import (
    Rows,
    check_input_shape,
    check_labels,
    open_for_model,
    open_rows,
    recorded_split,
    rows_for_bundle,
)
from ..errors import UserError
from ..manifest import load_manifest
from ..profile import load_costs
from ..render import calibration_plot
from . import checkpoint
from .model import GatedModel
from .torch_data import as_rows
from .train import collect_exit_logits
from .train import train_gates as _train_heads
from .zoo import arch_info, arch_registered, registered_arch_name


def attach_gates(backbone: nn.Module, exits: Sequence[str] | None = None, *, head: Any = "linear",
                 head_kwargs: dict | Sequence[dict] | None = None, data: Any = None,
                 input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, normalization: dict | None = None,
                 confidence: str = DEFAULT_CONFIDENCE, feature_layout: str | Sequence[str] = "auto",
                 arch: str | None = None, arch_kwargs: dict | None = None,
                 data_split: dict | None = None) -> GatedModel:
    """Attach fresh (or the user's own) gate heads to `backbone` (an nn.Module on the CPU, trained) after the
    modules named `exits`, in execution order (None: the registered architecture's default exits).

    head: "linear", "mlp", "grid" or a name registered with register_head; a factory (a class or function
        called as factory(in_shape, num_classes, **head_kwargs) for each exit, in_shape the exit's output
        shape per sample); or one head per exit (names or nn.Modules of your own, trained or not: any
        module mapping the exit's output to [N, classes]).
    data: rows to read what is not given from: input_shape (C, H, W), class_names, normalization.
    num_classes: default the number of class names, else the backbone's output width.
    arch / arch_kwargs: the name a checkpoint records (default: the name the backbone's class is registered
        under, else the class name; loading the checkpoint needs it registered, `register_arch`).
    Returns the GatedModel (thresholds off: every sample runs the whole network until calibrated).
    """
    rows = _rows_for_shape(data, input_shape) if data is not None else None
    if input_shape is None:
        if rows is None:
            raise UserError("attach_gates needs the input shape: give input_shape=(C, H, W) or data=... to read "
                            "it from.", "e.g. attach_gates(model, exits, input_shape=(1, 28, 28)).")
        input_shape = rows.sample_shape
    if len(input_shape) != 3:
        raise UserError(f"input_shape {tuple(input_shape)} is not (C, H, W).", "Give the shape of one image.")
    names = list(class_names) if class_names else (rows.class_names if rows is not None else None)
    name = arch or registered_arch_name(backbone) or type(backbone).__name__
    if exits is None:
        exits = arch_info(name).default_exits if arch_registered(name) else ()
        if not exits:
            raise UserError(f"No exits given, and {name!r} has no default exits.",
                            "Name the modules to gate after: attach_gates(model, ['layer1', 'layer2']); "
                            "print(model) lists them.")
    model = GatedModel.attach(
        backbone, list(exits), arch={"name": name, "kwargs": dict(arch_kwargs or {})},
        num_classes=num_classes if num_classes is not None else (len(names) if names else None),
        input_shape=tuple(int(d) for d in input_shape), head=head, head_kwargs=head_kwargs,
        confidence=confidence, class_names=names,
        normalization=normalization if normalization is not None else (rows.normalization if rows is not None else None),
        feature_layout=feature_layout if isinstance(feature_layout, str) else list(feature_layout),
        data_split=data_split)
    prep = getattr(rows, "prep", None)  # image folders: how files become input, recorded for build and score
    model.image = prep.to_dict() if prep is not None else None
    return model


def _rows_for_shape(data: Any, input_shape: Sequence[int] | None) -> Rows:
    """The rows attach_gates reads the input shape, class names and normalization from."""
    if not isinstance(data, str):
        return as_rows(data, what="data")
    image = None
    if data.startswith("folder:"):
        from ..images import ImagePrep

        if input_shape is None:
            raise UserError(f"data={data!r}: the size the images are prepared at is not known.",
                            "Give input_shape=(C, H, W), e.g. (3, 224, 224).")
        image = ImagePrep.for_input(tuple(input_shape))
    return open_rows(data, "train", image=image)


@dataclass
class GateTraining:
    """What train_gates did."""
    accuracy: list[float]  # training accuracy of each gate head
    rows: int  # training rows
    cache_bytes_per_row: int  # of the feature cache: every gate's pooled features, float32
    data_split: dict | None  # the validation split left out (a data set spec), as recorded in the model


def train_gates(model: GatedModel, data: Any, *, epochs: int = 10, loss: str = "ce", batch_size: int = 256,
                lr: float | None = None, weight_decay: float = 1e-4, seed: int = 0, progress: bool = True,
                val_size: int | None = None, data_dir: str | Path | None = None, repeat_channels: bool = False,
                num_workers: int = 0) -> GateTraining:
    """Train the gate heads of `model` on `data`, the backbone frozen (its weights and BatchNorm statistics
    untouched): one pass caches every gate's pooled features (the head's `pool`), then each head's
    `classify` trains on them for `epochs` (Adam, cosine schedule; `loss` "ce" or "hinge"), or for as many
    more as make train.MIN_GATE_STEPS optimizer steps on small data (`lr` None: the rate train.py
    chooses for that length).

    A data set spec trains on its training split less a seeded validation split (`val_size`, default 10% up
    to 5000; `seed`), which is recorded in the model so that calibrate_gates(model, spec) chooses thresholds
    on rows the gates never saw. Other data is all training rows: pass the validation rows to
    calibrate_gates yourself. `num_workers` reads a torch Dataset in that many processes."""
    split = model.data_split
    if isinstance(data, str):
        rows: Rows = _for_model(model, data, ("train",), where="the model", data_dir=data_dir,
                                repeat_channels=repeat_channels, val_size=val_size, seed=seed)["train"]
        split = {"data": data, "val_size": getattr(rows, "val_size", None), "seed": seed}
        prep = getattr(rows, "prep", None)
        if model.image is None and prep is not None:
            model.image = prep.to_dict()
    else:
        rows = as_rows(data, what="the training data", num_workers=num_workers)
    _check_rows(rows, model, "the training data")
    accuracy = _train_heads(model, rows, epochs=epochs, loss=loss, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, seed=seed, progress=progress)
    model.data_split = split
    return GateTraining(accuracy, len(rows), cache_bytes_per_row(model), split)


def _for_model(model: GatedModel, spec: str, splits: tuple[str, ...], **kwargs: Any) -> dict[str, Any]:
    """Splits of the data set `spec` as Rows prepared as `model` records (data.open_for_model)."""
    return open_for_model(spec, splits, input_shape=model.input_shape, normalization=model.normalization,
                          image=model.image, **kwargs)


def cache_bytes_per_row(model: GatedModel) -> int:
    """Bytes per training row of train_gates' feature cache (float32 pooled features of every gate)."""
    carries: tuple[torch.Tensor, ...] = (torch.zeros(1, *model.input_shape),)
    floats = 0
    with torch.no_grad():
        for k in range(model.num_gates):
            carries = model.segments[k](*carries)
            floats += int(model.heads[k].pool(carries[0]).numel())  # type: ignore[operator]
    return 4 * floats


def _check_rows(rows: Rows, model: GatedModel, what: str) -> None:
    check_input_shape(tuple(rows.sample_shape), list(model.input_shape), where=what)


@dataclass
class Calibrated:
    """calibrate_gates' result: the thresholds chosen (already set on the model), their test figures."""
    calibration: Calibration
    test: Evaluation | None  # the thresholds on the test rows (None: none given)
    separate_test: bool = True  # False: the spec's "test" rows are the whole file (seen in training)

    @property
    def thresholds(self) -> list[float]:
        return list(self.calibration.thresholds)


def calibrate_gates(model: GatedModel, data: Any, *, test: Any = None, target: Target | None = None,
                    confidence: str | None = None, cost: str | os.PathLike | None = None,
                    cost_batch: int | None = None, seed: int | None = None, val_size: int | None = None,
                    data_dir: str | Path | None = None, repeat_channels: bool = False, progress: bool = True,
                    num_workers: int = 0, warn: Callable[[str], Any] | None = None,
                    where: str = "the model") -> Calibrated:
    """Choose the thresholds of `model` for `target` (calibrate.Target: max_drop / budget, guarantee, delta,
    upper_bound, holdout; default: a drop of at most 1 point on new data with probability >= 90%) on the
    validation rows `data`, set them (and `confidence`) on the model and evaluate them on `test`.

    A data set spec calibrates on the validation split recorded in the model (train_gates or `gate` cut it;
    a `val_size` or `seed` that differs is refused) and tests on its test split unless `test` is given.
    Other data is taken as validation rows as it is: rows the gates never trained on. `cost`: a
    `dgate-export profile` JSON of this model's bundle: the least expected measured time instead of FLOPs.
    `warn` gets a line when the spec is not the data the model was gated on."""
    confidence = confidence or model.confidence
    flops = model.flops or model.count_flops()
    time_cost = None
    if cost_batch is not None and cost is None:
        raise UserError("--cost-batch chooses a batch size of a --cost profile.", "Add --cost profile.json.")
    if cost is not None:
        time_cost = load_costs(Path(cost), batch_size=cost_batch, model_structure={
            "exits": list(model.exits), "segment_flops": [int(f) for f in flops["segments"]],
            "head_flops": [int(f) for f in flops["heads"]]})
    separate_test = True
    if isinstance(data, str):
        split_size, split_seed = recorded_split(model.data_split, where, val_size, seed)
        gated_on = (model.data_split or {}).get("data")
        if gated_on and gated_on != data and warn is not None:  # a moved npz is the same data; another set is not
            warn(f"warning: {where} was gated on --data {gated_on}, this calibrates on {data}: its "
                 "validation rows must be ones the gates were never trained on.")
        opened = _for_model(model, data, ("val", "test") if test is None else ("val",), where=where,
                            data_dir=data_dir, repeat_channels=repeat_channels, val_size=split_size, seed=split_seed)
        val: Rows = opened["val"]
        if test is None:
            test = opened["test"]
            separate_test = getattr(test, "separate_test", True)
        seed = split_seed
    else:
        val = as_rows(data, what="the validation data", num_workers=num_workers)
    test_rows: Rows | None = None
    if isinstance(test, str):
        test_rows = _for_model(model, test, ("test",), where=where, data_dir=data_dir,
                               repeat_channels=repeat_channels)["test"]
    elif test is not None:
        test_rows = as_rows(test, what="the test data", num_workers=num_workers)
    seed = 0 if seed is None else seed
    spec = data if isinstance(data, str) else "the validation data"
    _check_rows(val, model, f"data set {spec!r} (val)" if isinstance(data, str) else "the validation data")
    if test_rows is not None:
        _check_rows(test_rows, model, f"data set {spec!r} (test)" if isinstance(data, str) else "the test data")

    costs = model.exit_costs()
    val_logits, val_y = collect_exit_logits(model, val, progress=progress)
    check_labels(val_y, model.num_classes, where=f"The labels of {spec!r} (val)")
    result = calibrate(val_logits, val_y, confidence=confidence, costs=time_cost[0] if time_cost else costs,
                       baseline_flops=1.0 if time_cost else flops["baseline"], target=target, seed=seed)
    if time_cost:
        _measured_time_figures(result, val_logits, val_y, confidence, costs, flops["baseline"], time_cost,
                               (target or Target()).holdout, seed)
    model.thresholds = list(result.thresholds)
    model.confidence = confidence
    model.calibration = calibration_record(result, target or Target())
    test_eval = None
    if test_rows is not None:
        test_logits, test_y = collect_exit_logits(model, test_rows, progress=progress)
        check_labels(test_y, model.num_classes, where=f"The labels of {spec!r} (test)")
        test_eval = evaluate(test_logits, test_y, confidence=confidence, thresholds=result.thresholds, costs=costs,
                             baseline_flops=flops["baseline"])
    return Calibrated(result, test_eval, separate_test)


def _measured_time_figures(result: Calibration, val_logits, val_y, confidence: str, flops_costs,
                           baseline_flops: float, time_cost: tuple[list[float], dict], holdout, seed: int) -> None:
    """After a calibration on measured times: keep the time figures in result.cost, put the FLOPs figures of
    the same rows back in the report, and refuse thresholds that are slower than the un-gated model."""
    costs, info = time_cost
    expected = result.validation.expected_flops  # in units of the un-gated model's time
    if expected >= 1.0:
        raise UserError(
            f"On this target ({info['description']}) the cheapest thresholds that keep the promise would take "
            f"{expected:.3f} x the un-gated model's time: gating would slow it down (the first exit alone costs "
            f"{costs[0]:.3f}, the whole gated chain {costs[-1]:.3f}). Nothing was written.",
            "Disable the gates (thresholds above 1, e.g. bench --thresholds "
            f"{','.join(['1.01'] * (len(costs) - 1))}) or serve the un-gated baseline on this target; or "
            "profile another batch size or backend, where gating pays.")
    rows = np.arange(len(val_y))
    if holdout is not None:
        rows, out = holdout_rows(len(val_y), holdout, seed)
        result.held_out = evaluate([lg[out] for lg in val_logits], val_y[out], confidence=confidence,
                                   thresholds=result.thresholds, costs=flops_costs, baseline_flops=baseline_flops)
    result.validation = evaluate([lg[rows] for lg in val_logits], val_y[rows], confidence=confidence,
                                 thresholds=result.thresholds, costs=flops_costs, baseline_flops=baseline_flops)
    result.cost = dict(info, unit="measured time / un-gated", exit_costs=list(costs), expected=float(expected))
    result.method += f"; cost: {info['description']} (the curve's costs are relative times)"


@dataclass
class SavedModel:
    """save_model's files."""
    path: Path  # model.pt
    curve_json: Path | None  # model.curve.json and .png: the accuracy-vs-cost curve (with a calibration)
    curve_png: Path | None
    unregistered: list[str] = field(default_factory=list)  # what loading the file needs registered first


def curve_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """The accuracy-vs-cost curve files written beside a gated model (JSON, PNG)."""
    return Path(output).with_suffix(".curve.json"), Path(output).with_suffix(".curve.png")


def save_model(model: GatedModel, path: str | os.PathLike, *, calibration: Calibrated | None = None) -> SavedModel:
    """Write `model` to `path` (model.pt: plain data and tensors, read back without running code) and, with
    the calibration, its accuracy-vs-cost curve beside it (model.curve.json, model.curve.png).

    The file records the architecture and heads by name: load_model (and `dgate-export build`) need them
    registered (register_arch, register_head); `unregistered` lists what is not (a model in memory builds
    without: build_bundle(model, ...))."""
    saved = Path(checkpoint.save(model, path))
    curve_json = curve_png = None
    if calibration is not None:
        curve_json, curve_png = curve_paths(saved)
        save_curve(calibration.calibration, curve_json, test=calibration.test)
        calibration_plot(calibration.calibration, curve_png, test=calibration.test)
    missing = checkpoint.unregistered(model.arch["name"], [h["name"] for h in model.head_specs])
    return SavedModel(saved, curve_json, curve_png, missing)


def load_model(path: str | os.PathLike) -> GatedModel:
    """A gated model written by save_model or `dgate-export gate` (its architecture and custom heads must be
    registered in this process; nothing in the file runs)."""
    return checkpoint.load(path)


def bench_bundle(bundle: str | os.PathLike, data: Any, *, batch_sizes: Sequence[int] = (1, 32, 256),
                 options: BenchOptions | None = None, backend: str | None = None,
                 runner_options: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure the bundle against its un-gated baseline on `data` (labelled rows: accuracy, exits, FLOPs,
    latency and throughput per batch size; a spec: its test split, prepared as the bundle records) with
    bench.run_bench, as `dgate-export bench` does; returns the report (docs/bench.md). `options`
    (bench.BenchOptions) overrides batch_sizes. The rows are read several times, in order: a DataLoader
    must not shuffle."""
    options = options or BenchOptions(batch_sizes=tuple(batch_sizes))
    if isinstance(data, str):
        rows = rows_for_bundle(load_manifest(Path(bundle)), data, ("test",), where=str(bundle))["test"]
        description = f"{data} test split"
    else:
        rows = as_rows(data, what="the data")
        description = type(data).__name__
    info = {"spec": data if isinstance(data, str) else "python", "split": "test" if isinstance(data, str) else None,
            "samples": len(rows), "labelled": True, "description": f"{description} ({len(rows)} samples)"}
    return run_bench(Path(bundle), rows, None, options, data_info=info, backend=backend, runner_options=runner_options,
                     progress=progress, command="dgate_export.compile.bench_bundle")
