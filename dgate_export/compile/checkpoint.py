"""Save and load a gated model (`model.pt`) without executing code from the file.

The file is a `torch.save` of plain data (str, int, float, lists, dicts, tensors) and is read with
`torch.load(weights_only=True)`, whose unpickler refuses every global outside a small allow-list, so a
crafted pickle cannot run code. The architecture is recorded by name and constructor arguments; the
code that builds it comes from this package (zoo, torchvision) or from a module the user imports.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..contract import DEFAULT_CONFIDENCE
from ..errors import UserError
from ..files import atomic_write
from .heads import HEADS
from .model import GatedModel
from .zoo import arch_registered, build_backbone

FORMAT = "dgate-model/1"


def save(model: GatedModel, path: str | os.PathLike) -> Path:
    path = Path(path)
    if model.flops is None:
        model.count_flops()
    payload = {
        "format": FORMAT,
        "dgate_export": __version__,
        "arch": model.arch,
        "exits": list(model.exits),
        "head": model.head_spec,
        "exit_heads": [dict(spec) for spec in model.head_specs],  # per exit {"name", "kwargs"}
        "confidence": model.confidence,
        "thresholds": [float(t) for t in model.thresholds],
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "class_names": model.class_names,
        "normalization": model.normalization,
        "image": model.image,
        "flops": model.flops,
        "data_split": model.data_split,
        "calibration": model.calibration,
        "feature_layouts": list(model.feature_layouts),
        "backbone": _cpu_state(model.backbone),
        "heads": _cpu_state(model.heads),
    }
    return atomic_torch_save(payload, path)


def _cpu_state(module: torch.nn.Module) -> OrderedDict:
    """module.state_dict() on the CPU, keeping its `_metadata` (the modules' versions): some modules
    (torchvision's MNASNet) refuse to load a state without them."""
    state = module.state_dict()
    out = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())  # type: ignore[attr-defined]
    return out


def load_state(module: torch.nn.Module, state: dict) -> None:
    """module.load_state_dict(state); a state without `_metadata` (written before it was kept, or a
    plain dict of tensors) gets the module versions of this code's own modules."""
    if getattr(state, "_metadata", None) is None:
        state = OrderedDict(state)
        state._metadata = module.state_dict()._metadata  # type: ignore[attr-defined]
    module.load_state_dict(state)


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """torch.save into a temporary file beside `path`, then rename: never a half-written file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_payload(path: str | os.PathLike) -> dict:
    """The checkpoint's dict, validated; nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file.", "Give the path of a gated model written by `dgate-export gate`.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes about foreign pickles add nothing here
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file fails in many ways (zip, pickle memo, storage sizes)
        raise unreadable_torch_file(err, f"{path}", "a gated checkpoint",
                                    "Re-create it with `dgate-export gate` (or `dgate-export calibrate`).") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise UserError(
            f"{path} is not a gated checkpoint (expected format {FORMAT!r}, found {found!r}).",
            "A plain backbone state_dict goes to `dgate-export gate --weights FILE`.",
        )
    missing = [k for k in ("arch", "exits", "head", "thresholds", "input_shape", "num_classes", "backbone", "heads")
               if k not in payload]
    if missing:
        raise UserError(f"{path} lacks the fields {missing}; it is damaged.")
    return payload


def load(path: str | os.PathLike) -> GatedModel:
    payload = read_payload(path)
    arch = payload["arch"]
    heads = payload.get("exit_heads") or [payload["head"]] * len(payload["exits"])
    missing = unregistered(arch["name"], [h["name"] for h in heads])
    if missing:
        raise UserError(f"{path} was gated with {' and '.join(missing)}, not registered in this process: a "
                        "checkpoint records code by name and never holds it.", REGISTER_HINT)
    backbone = build_backbone(arch["name"], arch.get("kwargs"))
    try:
        load_state(backbone, payload["backbone"])
    except RuntimeError as err:
        raise UserError(f"{path}: the backbone weights do not fit architecture {arch['name']!r}: "
                        f"{_first_line(err)}") from err
    model = GatedModel(
        backbone,
        payload["exits"],
        arch=arch,
        num_classes=payload["num_classes"],
        input_shape=tuple(payload["input_shape"]),
        head=[h["name"] for h in heads],
        head_kwargs=[h.get("kwargs") or {} for h in heads],
        confidence=payload.get("confidence", DEFAULT_CONFIDENCE),
        thresholds=payload["thresholds"],
        class_names=payload.get("class_names"),
        normalization=payload.get("normalization"),
        flops=payload.get("flops"),
        data_split=payload.get("data_split"),  # None in files written before it was recorded
        # files written before layouts were recorded: their heads pooled every exit as NCHW
        feature_layout=payload.get("feature_layouts", "nchw"),
    )
    model.calibration = payload.get("calibration")  # None in files written before it was recorded
    try:
        load_state(model.heads, payload["heads"])
    except RuntimeError as err:
        raise UserError(f"{path}: the gate heads' weights do not fit: {_first_line(err)}",
                        "A registered head factory must build the same head from (in_shape, num_classes, "
                        "**head_kwargs) as the one saved.") from err
    model.image = payload.get("image")  # None: gated on arrays (or written before images were recorded)
    return model.eval()


REGISTER_HINT = ("Register it in a module you trust, with dgate_export.compile.register_arch(NAME, factory) "
                 "(factory(**kwargs) -> the nn.Module) or register_head(NAME, factory) (factory(in_shape, "
                 "num_classes, **kwargs) -> the head module), and name that module first: `dgate-export --import "
                 "mymodels build model.pt` (mymodels.py on PYTHONPATH); or build from Python with the model in "
                 "memory: dgate_export.compile.build_bundle(model, 'engines/NAME') (a bundle needs no registry).")


def unregistered(arch: str, heads: list[str]) -> list[str]:
    """What of a gated model is not registered here (empty: a checkpoint of it loads), in words:
    "architecture 'MyNet'", "gate head 'MyHead'"."""
    missing = [] if arch_registered(arch) else [f"architecture {arch!r}"]
    names = list(dict.fromkeys(h for h in heads if h not in HEADS))
    if names:
        missing.append(f"gate head{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names)}")
    return missing


@dataclass
class SegmentSummary:
    ends_at: str               # the exit module the segment ends at; "output" for the last segment
    params: int                # the segment's parameters, plus its gate head's
    flops: int                 # per sample, the segment alone
    head_flops: int | None     # the gate head's (None: the last segment has none)
    threshold: float | None    # the gate's (None: the last segment)
    cost: float                # FLOPs per sample of leaving here (segments and heads up to here)


@dataclass
class CheckpointSummary:
    """What `dgate-export inspect model.pt` shows (render.checkpoint_tables prints it)."""

    path: str
    arch: dict[str, Any]
    input_shape: list[int]
    num_classes: int
    confidence: str
    head: str
    feature_layouts: list[str]
    segments: list[SegmentSummary]
    baseline_flops: int
    data_split: dict[str, Any] | None


def summarize(path: str | os.PathLike) -> CheckpointSummary:
    """Load a gated checkpoint and sum up its segments: parameters, FLOPs, thresholds, exit costs."""
    model = load(path)
    flops = model.flops or model.count_flops()
    costs = model.exit_costs()
    segments = []
    for k, segment in enumerate(model.segments):
        gate = k < model.num_gates
        params = sum(p.numel() for p in segment.parameters()) + (
            sum(p.numel() for p in model.heads[k].parameters()) if gate else 0)
        segments.append(SegmentSummary(model.exits[k] if gate else "output", params, flops["segments"][k],
                                       flops["heads"][k] if gate else None,
                                       model.thresholds[k] if gate else None, costs[k]))
    return CheckpointSummary(str(path), model.arch, list(model.input_shape), model.num_classes, model.confidence,
                             ", ".join(dict.fromkeys(h["name"] for h in model.head_specs)),
                             list(model.feature_layouts), segments, flops["baseline"],
                             model.data_split)


def unreadable_torch_file(err: BaseException, what: str, expected: str, hint: str) -> UserError:
    """The UserError for a file torch.load(weights_only=True) refused or could not read. torch's own
    message advises `weights_only=False`; that is never passed on (it would run the file's code)."""
    text = str(err)
    unsafe = re.search(r"(?:unsupported GLOBAL|Unsupported global:?)\s*(?:GLOBAL\s*)?([\w.]+)", text, re.IGNORECASE)
    if isinstance(err, pickle.UnpicklingError) and unsafe:
        return UserError(
            f"{what} was refused: it is not {expected}: it holds a Python object ({unsafe.group(1)}) that "
            "such files never contain, and loading it could run code. Nothing from it was executed.",
            hint)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.DOTALL)
    reason = _first_line(detail.group(1)) if detail else _first_line(err)
    if "weights_only" in reason:
        reason = type(err).__name__
    return UserError(f"{what} is not {expected}, or it is corrupt or truncated: it cannot be read as one "
                     f"({reason}). Nothing from it was executed.", hint)


def _first_line(err: BaseException | str) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
