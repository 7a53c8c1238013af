"""`dgate-export gate`: a backbone -> a gated model (model.pt) with calibrated thresholds, in named steps.

    1 check      the options, before any work: target, output writable, architecture, exits
    2 backbone   build it from the zoo; load `weights` (a state_dict, checked against the architecture)
    3 data       the train / val / test splits; the validation split (default: 10% of the training rows,
                 at most 5000) is the one the gates never train on, recorded in the model
    4 attach     gate heads at the exits (names, order, branches, layouts checked before any training)
    5 train      the backbone, only without `weights`
    6 gates      the heads, backbone frozen, on cached pooled features (train.train_gates)
    7 calibrate  thresholds on the validation split, figures on the test split (calibrate_model)
    8 save       model.pt, model.curve.json and model.curve.png, each written atomically (save_gated)

`gate_backbone(GateOptions(...))` runs them all and returns a `GateResult` (the model, the files
written, the calibration and its test figures); progress lines go to `progress`, the report is the
caller's to print. `dgate-export calibrate MODEL` reruns steps 7 and 8 on a saved model.

The name says what it is: the pipeline behind the `gate` command, as build.py is the one behind
`build`; gates.py holds the heads and gated.py the model they make.

torch is imported inside the functions, so that importing this module (and the CLI) needs no torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .calibrate import DEFAULT_DELTA, Calibration, Evaluation, default_target
from .contract import DEFAULT_CONFIDENCE
from .data import DEFAULT_VAL_SIZE, Dataset
from .errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from .gated import GatedModel


@dataclass(frozen=True)
class GateOptions:
    """What `gate` needs: the `dgate-export gate` options, typed (arch_kwargs parsed, exits split)."""

    arch: str
    data: str  # fashion-mnist or npz:PATH
    output: str | os.PathLike  # the gated model to write (model.pt)
    arch_kwargs: dict[str, Any] | None = None
    weights: str | os.PathLike | None = None  # a backbone state_dict; None: the backbone is trained first
    exits: Sequence[str] | None = None  # module names; None: the architecture's default exits
    data_dir: str | Path | None = None
    repeat_channels: bool = False  # repeat 1-channel data to the backbone's channel count
    val_size: int | None = None  # None: 10% of the training rows, at most DEFAULT_VAL_SIZE
    epochs: int = 10  # gate training epochs
    backbone_epochs: int = 2  # without weights
    batch_size: int = 128  # backbone training
    head: str = "linear"
    head_kwargs: dict[str, Any] | None = None
    feature_layout: str | Sequence[str] = "auto"  # one for all exits, or one per exit
    confidence: str = DEFAULT_CONFIDENCE
    loss: str = "ce"
    # The threshold target (calibrate's keywords); neither max_drop nor budget: calibrate.DEFAULT_MAX_DROP.
    max_drop: float | None = None
    budget: float | None = None
    guarantee: str = "ltt"
    delta: float = DEFAULT_DELTA
    upper_bound: float | None = None
    holdout: float | None = None
    seed: int = 0  # of the validation split and of training
    progress_bars: bool = True  # tqdm bars on stderr


@dataclass
class Calibrated:
    """Step 7's result: the thresholds chosen on validation (already set on the model), the test figures."""

    calibration: Calibration
    test: Evaluation


@dataclass
class SavedModel:
    """Step 8's files."""

    path: Path  # model.pt
    curve_json: Path
    curve_png: Path


@dataclass
class GateResult:
    model: GatedModel
    files: SavedModel
    calibration: Calibration
    test: Evaluation
    gate_accuracy: list[float]  # training accuracy of each gate head
    val_size: int  # validation rows held out (recorded in the model's data_split)
    separate_test: bool  # False: the data has no test arrays of its own (the test figures include seen rows)


def gate_backbone(options: GateOptions, progress: Callable[[str], Any] | None = print) -> GateResult:
    """Run steps 1-8 for `options`; return what was made. UserError (nothing written) on a user mistake."""
    import torch

    from .train import train_backbone, train_gates

    say = progress or (lambda _line: None)
    exits, target = _check(options)

    torch.manual_seed(options.seed)
    backbone = load_backbone(options.arch, options.arch_kwargs, options.weights)
    channels = input_channels(backbone)
    splits = load_data(options, channels)
    train = splits["train"]
    val_size = options.val_size
    if val_size is None and splits["val"].val_size is not None:
        val_size = splits["val"].val_size
        say(f"validation split: {val_size} of the {val_size + len(train)} training rows held out for "
            f"calibration (the default, 10% up to {DEFAULT_VAL_SIZE}; --val-size to choose)")
    val_size = DEFAULT_VAL_SIZE if val_size is None else val_size  # recorded; unused where the data has x_val
    # Check the exits (names, order, branches) and the output size before minutes of training.
    attach(backbone, exits, options, list(splits.values()), val_size=val_size)

    if options.weights:
        say(f"backbone: {options.arch} with weights from {options.weights}")
    else:
        say(f"No --weights: training the backbone {options.arch} on {options.data} ({len(train)} images) for "
            f"{options.backbone_epochs} epoch(s) first.")
        train_backbone(backbone, train, epochs=options.backbone_epochs, batch_size=options.batch_size,
                       seed=options.seed, progress=options.progress_bars)

    torch.manual_seed(options.seed)
    model = attach(backbone, exits, options, list(splits.values()), val_size=val_size)
    model.count_flops()
    gate_acc = train_gates(model, train, epochs=options.epochs, loss=options.loss, seed=options.seed,
                           progress=options.progress_bars)
    say("gate training accuracy: " + ", ".join(f"{e} {a:.2%}" for e, a in zip(exits, gate_acc)))
    done = calibrate_model(model, splits, confidence=options.confidence, seed=options.seed,
                           progress_bars=options.progress_bars, **target)
    files = save_gated(model, options.output, done.calibration, done.test)
    return GateResult(model, files, done.calibration, done.test, gate_acc, val_size, splits["test"].separate_test)


# ------------------------------------------------------------------------------------------ 1. check


def _check(options: GateOptions) -> tuple[list[str], dict[str, Any]]:
    """The exits to gate and the calibration target (calibrate's keywords); UserError before any work."""
    from .calibrate import check_target
    from .outputs import check_writable
    from .zoo import arch_info

    max_drop, budget = default_target(options.max_drop, options.budget)
    target: dict[str, Any] = {"max_drop": max_drop, "budget": budget, "guarantee": options.guarantee,
                              "delta": options.delta, "upper_bound": options.upper_bound, "holdout": options.holdout}
    check_target(**{k: v for k, v in target.items() if k != "holdout"})
    if Path(options.output).is_dir():
        raise UserError(f"-o {options.output} is a directory.", "Give the file to write, e.g. -o runs/model.pt.")
    check_writable(options.output)  # before minutes of training
    info = arch_info(options.arch)
    exits = list(options.exits) if options.exits else list(info.default_exits)
    if not exits:
        raise UserError(f"Architecture {options.arch!r} has no default exits.",
                        "Name the modules to gate after with --exits a,b,c.")
    return exits, target


# --------------------------------------------------------------------------------------- 2. backbone


def load_backbone(arch: str, arch_kwargs: dict[str, Any] | None = None,
                  weights: str | os.PathLike | None = None) -> nn.Module:
    """The zoo's `arch` built with `arch_kwargs`, with the state_dict `weights` loaded when given."""
    from .zoo import build_backbone

    backbone = build_backbone(arch, dict(arch_kwargs or {}))
    if weights:
        load_weights(backbone, weights)
    return backbone


def load_weights(backbone: nn.Module, weights: str | os.PathLike) -> None:
    """Load a state_dict file into `backbone`; UserError when it is missing, not a state_dict or does not fit."""
    import torch

    from .checkpoint import load_state, unreadable_torch_file

    if not Path(weights).is_file():
        raise UserError(f"--weights {weights}: no such file.", "Give a state_dict saved with torch.save.")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise unreadable_torch_file(err, f"--weights {weights}", "a state_dict (a dict of tensors)",
                                    "Save the weights with torch.save(model.state_dict(), path).") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {weights} is not a state_dict (a dict of tensors).",
                        "Save the weights with torch.save(model.state_dict(), path).")
    try:
        load_state(backbone, state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"--weights {weights} do not fit the architecture: {first}",
                        "Check --arch and --arch-kwargs (width, depth, num_classes) against the weights.") from err


def input_channels(backbone: nn.Module) -> int | None:
    """Channels the backbone takes: those of its first convolution (None when it has none)."""
    from torch import nn

    for module in backbone.modules():
        if isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d):
            return int(module.in_channels)
    return None


# ------------------------------------------------------------------------------------------- 3. data


def load_data(options: GateOptions, channels: int | None) -> dict[str, Dataset]:
    """The three splits of options.data; with repeat_channels, 1-channel data repeated to `channels`.
    Every split must have the backbone's channel count (when it has a convolution to tell)."""
    from .data import check_input_shape, load_splits

    splits = load_splits(options.data, data_dir=options.data_dir,
                         channels=channels if options.repeat_channels else None,
                         val_size=options.val_size, seed=options.seed)
    if channels is not None:
        for ds in splits.values():
            check_input_shape(ds.x, (channels, *ds.x.shape[2:]), where=f"data set {options.data!r} ({ds.split})")
    return splits


# ----------------------------------------------------------------------------------------- 4. attach


def attach(backbone: nn.Module, exits: Sequence[str], options: GateOptions, data: Sequence[Dataset], *,
           val_size: int) -> GatedModel:
    """Fresh gate heads on `backbone` at `exits` (options.head, head_kwargs, confidence, feature_layout),
    sized for `data` (classes: the most any split has; input shape, class names, normalization: the first).
    The model records its validation split: options.data, `val_size` rows, options.seed."""
    from .gated import GatedModel

    first = data[0]
    layout = options.feature_layout
    arch = {"name": options.arch, "kwargs": dict(options.arch_kwargs or {})}
    return GatedModel.attach(backbone, list(exits), arch=arch,
                             num_classes=max(ds.num_classes for ds in data), input_shape=tuple(first.x.shape[1:]),
                             head=options.head, head_kwargs=options.head_kwargs, confidence=options.confidence,
                             class_names=first.class_names, normalization=first.normalization,
                             feature_layout=layout if isinstance(layout, str) else list(layout),
                             data_split={"data": options.data, "val_size": val_size, "seed": options.seed})


# -------------------------------------------------------------------------------------- 7. calibrate


def calibrate_model(model: GatedModel, splits: dict[str, Dataset], *, confidence: str, max_drop: float | None,
                    budget: float | None, seed: int, guarantee: str = "ltt", delta: float = DEFAULT_DELTA,
                    upper_bound: float | None = None, holdout: float | None = None, progress_bars: bool = True,
                    time_cost: tuple[list[float], dict] | None = None) -> Calibrated:
    """Choose thresholds on splits["val"] (calibrate.calibrate), set them and `confidence` on `model`,
    and evaluate them on splits["test"]. With `time_cost` (relative exit times from a profile, and its
    description) the expected measured time is minimized instead of FLOPs."""
    from .calibrate import calibrate, evaluate
    from .train import collect_exit_logits

    flops = model.flops or model.count_flops()
    costs = model.exit_costs()
    val_logits, val_y = collect_exit_logits(model, splits["val"], progress=progress_bars)
    result = calibrate(val_logits, val_y, confidence=confidence, costs=time_cost[0] if time_cost else costs,
                       baseline_flops=1.0 if time_cost else flops["baseline"], max_drop=max_drop, budget=budget,
                       upper_bound=upper_bound, holdout=holdout, seed=seed, guarantee=guarantee, delta=delta)
    if time_cost:
        _measured_time_figures(result, val_logits, val_y, confidence, costs, flops["baseline"], time_cost,
                               holdout, seed)
    model.thresholds = list(result.thresholds)
    model.confidence = confidence
    test_logits, test_y = collect_exit_logits(model, splits["test"], progress=progress_bars)
    test = evaluate(test_logits, test_y, confidence=confidence, thresholds=result.thresholds, costs=costs,
                    baseline_flops=flops["baseline"])
    return Calibrated(result, test)


def _measured_time_figures(result: Calibration, val_logits, val_y, confidence: str, flops_costs,
                           baseline_flops: float, time_cost: tuple[list[float], dict], holdout, seed: int) -> None:
    """After a calibration on measured times: keep the time figures in result.cost, put the FLOPs figures of
    the same rows back in the report, and refuse thresholds that are slower than the un-gated model."""
    import numpy as np

    from .calibrate import evaluate, holdout_rows

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


# ------------------------------------------------------------------------------------------- 8. save


def save_gated(model: GatedModel, output: str | os.PathLike, result: Calibration,
               test: Evaluation | None) -> SavedModel:
    """model.pt, then its accuracy-vs-cost curve beside it (model.curve.json, model.curve.png)."""
    from . import checkpoint
    from .calibrate import save_curve
    from .render import calibration_plot

    path = checkpoint.save(model, output)
    curve_json, curve_png = Path(path).with_suffix(".curve.json"), Path(path).with_suffix(".curve.png")
    save_curve(result, curve_json, test=test)
    calibration_plot(result, curve_png, test=test)
    return SavedModel(Path(path), curve_json, curve_png)
