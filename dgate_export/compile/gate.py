"""`dgate-export gate`: a backbone -> a gated model (model.pt) with calibrated thresholds, in named steps.

    1 check      the options, before any work: target, output writable, architecture, exits
    2 backbone   build it from the zoo; load `weights` (a state_dict, checked against the architecture)
    3 data       the train / val / test splits, opened as data.Rows (read in batches, never whole); the
                 validation split (default: 10% of the training rows, at most 5000) is the one the gates
                 never train on, recorded in the model; image folders' preparation is recorded too
    4 attach     gate heads at the exits (names, order, branches, layouts checked before any training)
    5 train      the backbone, only without `weights`
    6 gates      the heads, backbone frozen, on cached pooled features (train_gates)
    7 calibrate  thresholds on the validation split, figures on the test split (calibrate_gates)
    8 save       model.pt, model.curve.json and model.curve.png, each written atomically (save_model)

`gate_backbone(GateOptions(...))` runs them all and returns a `GateResult` (the model, the files
written, the calibration and its test figures); progress lines go to `progress`, the report is the
caller's to print. `dgate-export calibrate MODEL` reruns steps 7 and 8 on a saved model.

The pipeline behind the `gate` command, as build.py is the one behind `build`; heads.py holds the
heads and model.py the gated model they make. `calibrate_checkpoint` is `calibrate MODEL`. Steps 4, 6,
7 and 8 are the public Python API's functions (api.py: attach_gates, train_gates, calibrate_gates,
save_model): the CLI and a user's script run the same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibrate import Calibration, Evaluation, Target
from ..contract import DEFAULT_CONFIDENCE
from ..data import (
    DEFAULT_VAL_SIZE,
    Rows,
    SplitTooLarge,
    check_input_shape,
    data_file,
    num_classes,
    open_splits,
)
from ..errors import UserError
from ..outputs import check_output, check_rewrite
from . import checkpoint
from .api import SavedModel, attach_gates, calibrate_gates, curve_paths, save_model, train_gates
from .checkpoint import load_state, unreadable_torch_file
from .heads import head_info
from .model import GatedModel
from .train import train_backbone
from .zoo import arch_info, build_backbone


@dataclass(frozen=True)
class GateOptions:
    """What `gate` needs: the `dgate-export gate` options, typed (arch_kwargs parsed, exits split)."""
    arch: str
    data: str  # a data spec: fashion-mnist, npz:PATH, npy:DIR or folder:PATH
    output: str | os.PathLike  # the gated model to write (model.pt)
    arch_kwargs: dict[str, Any] | None = None
    weights: str | os.PathLike | None = None  # a backbone state_dict; None: the backbone is trained first
    exits: Sequence[str] | None = None  # module names; None: the architecture's default exits
    data_dir: str | Path | None = None
    repeat_channels: bool = False  # repeat 1-channel data to the backbone's channel count
    image_size: int | None = None  # folder: data: the (square) input size images are cropped to
    resize: int | None = None  # folder: data: the shorter side is resized to this first [image_size]
    normalize: str | None = None  # raw pixels: imagenet, none or MEAN/STD [the data's own, else imagenet / none]
    val_size: int | None = None  # None: 10% of the training rows, at most DEFAULT_VAL_SIZE
    epochs: int = 10  # gate training epochs
    backbone_epochs: int = 2  # without weights
    batch_size: int = 128  # backbone training
    head: str = "linear"
    head_kwargs: dict[str, Any] | None = None
    feature_layout: str | Sequence[str] = "auto"  # one for all exits, or one per exit
    confidence: str = DEFAULT_CONFIDENCE
    loss: str = "ce"
    target: Target = field(default_factory=Target)  # what the thresholds are chosen for
    seed: int = 0  # of the validation split and of training
    progress_bars: bool = True  # tqdm bars on stderr


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
    say = progress or (lambda _line: None)
    exits = _check(options)

    torch.manual_seed(options.seed)
    backbone = load_backbone(options.arch, options.arch_kwargs, options.weights)
    channels = input_channels(backbone)
    splits = load_data(options, channels)
    train = splits["train"]
    val_size = options.val_size
    held_out = getattr(splits["val"], "val_size", None)
    if val_size is None and held_out is not None:
        val_size = held_out
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
    trained = train_gates(model, train, epochs=options.epochs, loss=options.loss, seed=options.seed,
                          progress=options.progress_bars)
    gate_acc = trained.accuracy
    say("gate training accuracy: " + ", ".join(f"{e} {a:.2%}" for e, a in zip(exits, gate_acc)))
    done = calibrate_gates(model, splits["val"], test=splits["test"], confidence=options.confidence,
                           target=options.target, seed=options.seed, progress=options.progress_bars)
    files = save_model(model, options.output, calibration=done)
    assert done.test is not None
    return GateResult(model, files, done.calibration, done.test, gate_acc, val_size,
                      getattr(splits["test"], "separate_test", True))


# ------------------------------------------------------------------------------------------ 1. check


def _check(options: GateOptions) -> list[str]:
    """The exits to gate; UserError before any work (the Target checked itself when it was made)."""
    check_saved_outputs(options.output, "-o", reads=(options.weights, data_file(options.data)))  # before training
    info = arch_info(options.arch)
    head_info(options.head)  # an unknown head is refused before minutes of training
    exits = list(options.exits) if options.exits else list(info.default_exits)
    if not exits:
        raise UserError(f"Architecture {options.arch!r} has no default exits.",
                        "Name the modules to gate after with --exits a,b,c.")
    return exits


# --------------------------------------------------------------------------------------- 2. backbone


def load_backbone(arch: str, arch_kwargs: dict[str, Any] | None = None,
                  weights: str | os.PathLike | None = None) -> nn.Module:
    """The zoo's `arch` built with `arch_kwargs`, with the state_dict `weights` loaded when given."""
    backbone = build_backbone(arch, dict(arch_kwargs or {}))
    if weights:
        load_weights(backbone, weights)
    return backbone


def load_weights(backbone: nn.Module, weights: str | os.PathLike) -> None:
    """Load a state_dict file into `backbone`; UserError when it is missing, not a state_dict or does not fit."""
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
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d):
            return int(module.in_channels)
    return None


# ------------------------------------------------------------------------------------------- 3. data


def load_data(options: GateOptions, channels: int | None) -> Mapping[str, Rows]:
    """The three splits of options.data as Rows; with repeat_channels, 1-channel data repeated to
    `channels`. Every split must have the backbone's channel count (when it has a convolution to tell).
    Image folders are prepared for `channels` at options.image_size (required for them)."""
    image = None
    if options.data.startswith("folder:"):
        from ..images import ImagePrep

        if options.image_size is None:
            raise UserError(f"--data {options.data}: give the input size the images are prepared at.",
                            "Add --image-size (e.g. 224; --resize sets the shorter side before the centre crop).")
        image = ImagePrep.for_input((channels or 3, options.image_size, options.image_size), resize=options.resize)
    elif options.image_size is not None or options.resize is not None:
        raise UserError("--image-size and --resize apply to folder: data only.", "Drop them.")
    try:
        splits = open_splits(options.data, data_dir=options.data_dir,
                             channels=channels if options.repeat_channels else None,
                             val_size=options.val_size, seed=options.seed, normalization=options.normalize,
                             image=image)
    except SplitTooLarge as err:
        if err.rows < 2:
            raise
        raise UserError(err.message, f"Choose --val-size between 1 and {err.rows - 1}.") from err
    if channels is not None:
        for name, ds in splits.items():
            shape = ds.sample_shape
            check_input_shape(shape, (channels, *shape[1:]), where=f"data set {options.data!r} ({name})")
    return splits


# ----------------------------------------------------------------------------------------- 4. attach


def attach(backbone: nn.Module, exits: Sequence[str], options: GateOptions, data: Sequence[Rows], *,
           val_size: int) -> GatedModel:
    """Fresh gate heads on `backbone` at `exits` (options.head, head_kwargs, confidence, feature_layout),
    sized for `data` (classes: the most any split has; input shape, class names, normalization and image
    preparation: the first). The model records its validation split: options.data, `val_size` rows, options.seed."""
    first = data[0]
    return attach_gates(backbone, list(exits), data=first, arch=options.arch, arch_kwargs=options.arch_kwargs,
                        num_classes=max(num_classes(ds) for ds in data), input_shape=tuple(first.sample_shape),
                        head=options.head, head_kwargs=options.head_kwargs, confidence=options.confidence,
                        class_names=first.class_names, normalization=first.normalization,
                        feature_layout=options.feature_layout,
                        data_split={"data": options.data, "val_size": val_size, "seed": options.seed})


@dataclass
class Recalibrated:
    """`calibrate MODEL`'s result: the model with its new thresholds, the calibration, the files written."""

    model: GatedModel
    calibration: Calibration
    test: Evaluation
    files: SavedModel
    separate_test: bool  # False: the data has no test arrays of its own (the test figures include seen rows)


def calibrate_checkpoint(model_path: str | os.PathLike, data: str, *, target: Target | None = None,
                         output: str | os.PathLike | None = None, confidence: str | None = None,
                         data_dir: str | Path | None = None, repeat_channels: bool = False,
                         val_size: int | None = None, seed: int | None = None, cost_path: str | Path | None = None,
                         cost_batch: int | None = None, progress_bars: bool = True,
                         warn: Callable[[str], Any] | None = None) -> Recalibrated:
    """`dgate-export calibrate MODEL`: steps 7 and 8 again on a saved gated model, on the validation split
    it records, without retraining (calibrate_gates); written to `output` (default: MODEL itself).
    `cost_path` (a `dgate-export profile`) minimizes measured time instead of FLOPs. `warn` gets a line when
    `data` is not what the model was gated on."""
    check_saved_outputs(output or model_path, "-o" if output else "MODEL", in_place=output is None,
                        reads=(None if output is None else model_path, cost_path, data_file(data)))
    if cost_batch is not None and not cost_path:
        raise UserError("--cost-batch chooses a batch size of a --cost profile.", "Add --cost profile.json.")
    model = checkpoint.load(model_path)
    done = calibrate_gates(model, data, target=target, confidence=confidence, cost=cost_path, cost_batch=cost_batch,
                           seed=seed, val_size=val_size, data_dir=data_dir, repeat_channels=repeat_channels,
                           progress=progress_bars, warn=warn, where=str(model_path))
    assert done.test is not None
    files = save_model(model, output or model_path, calibration=done)
    return Recalibrated(model, done.calibration, done.test, files, done.separate_test)


# ------------------------------------------------------------------------------------------- 8. save


def check_saved_outputs(output: str | os.PathLike, flag: str, *, reads: Sequence[Any] = (),
                        in_place: bool = False) -> None:
    """What save_model writes (the model and its curve files), refused before any work when it must not or
    cannot be written (outputs.check_output); `in_place`: the model rewrites the file it was read from."""
    if in_place:
        check_rewrite(output, flag)
    else:
        check_output(output, flag=flag, reads=reads)
    for path in curve_paths(output):
        check_output(path, flag="the curve file", reads=reads)
