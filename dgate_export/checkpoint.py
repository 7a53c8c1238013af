"""Save and load a gated model (`model.pt`) without executing code from the file.

The file is a `torch.save` of plain data (str, int, float, lists, dicts, tensors) and is read with
`torch.load(weights_only=True)`, whose unpickler refuses every global outside a small allow-list, so a
crafted pickle cannot run code. The architecture is recorded by name and constructor arguments; the
code that builds it comes from this package (zoo, torchvision) or from a module the user imports.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch

from . import __version__
from .errors import UserError
from .gated import GatedModel
from .zoo import build_backbone

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
        "confidence": model.confidence,
        "thresholds": [float(t) for t in model.thresholds],
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "class_names": model.class_names,
        "normalization": model.normalization,
        "flops": model.flops,
        "data_split": model.data_split,
        "backbone": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
        "heads": {k: v.detach().cpu() for k, v in model.heads.state_dict().items()},
    }
    return atomic_torch_save(payload, path)


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """torch.save into a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_payload(path: str | os.PathLike) -> dict:
    """The checkpoint's dict, validated; nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file.", "Give the path of a gated model written by `dgate-export gate`.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes about foreign pickles add nothing here
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path} was refused: it holds Python objects that a gated checkpoint never contains, and "
            f"loading them could run code ({_first_line(err)}). Nothing from it was executed.",
            "Only load files written by `dgate-export gate` or `dgate_export.checkpoint.save`.",
        ) from err
    except Exception as err:  # a damaged file fails in many ways (zip, pickle memo, storage sizes)
        raise UserError(
            f"{path} is not a readable checkpoint: it is truncated, corrupt or not a torch file "
            f"({_first_line(err)}).",
            "Re-create it with `dgate-export gate` (or `dgate-export calibrate`).",
        ) from err
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
    backbone = build_backbone(arch["name"], arch.get("kwargs"))
    try:
        backbone.load_state_dict(payload["backbone"])
    except RuntimeError as err:
        raise UserError(f"{path}: the backbone weights do not fit architecture {arch['name']!r}: "
                        f"{_first_line(err)}") from err
    model = GatedModel(
        backbone,
        payload["exits"],
        arch=arch,
        num_classes=payload["num_classes"],
        input_shape=tuple(payload["input_shape"]),
        head=payload["head"]["name"],
        head_kwargs=payload["head"].get("kwargs"),
        confidence=payload.get("confidence", "max-softmax"),
        thresholds=payload["thresholds"],
        class_names=payload.get("class_names"),
        normalization=payload.get("normalization"),
        flops=payload.get("flops"),
        data_split=payload.get("data_split"),  # None in files written before it was recorded
    )
    try:
        model.heads.load_state_dict(payload["heads"])
    except RuntimeError as err:
        raise UserError(f"{path}: the gate heads' weights do not fit: {_first_line(err)}") from err
    return model.eval()


def describe(path: str | os.PathLike) -> None:
    """Print a gated checkpoint as tables (used by `dgate-export inspect model.pt`)."""
    from rich.console import Console
    from rich.table import Table

    model = load(path)
    flops = model.flops or model.count_flops()
    console = Console()
    console.print(f"[bold]{path}[/]: {model.arch['name']} {model.arch['kwargs'] or ''}, "
                  f"input {list(model.input_shape)}, {model.num_classes} classes, "
                  f"confidence {model.confidence}, head {model.head_spec['name']}")
    table = Table(title="segments (FLOPs per sample, 2 x MACs)")
    for col in ("segment", "ends at", "params", "FLOPs", "head FLOPs", "threshold", "cost if exiting here"):
        table.add_column(col, justify="right" if col not in ("ends at",) else "left")
    costs = model.exit_costs()
    for k, segment in enumerate(model.segments):
        gate = k < model.num_gates
        params = sum(p.numel() for p in segment.parameters()) + (
            sum(p.numel() for p in model.heads[k].parameters()) if gate else 0)
        table.add_row(
            str(k),
            model.exits[k] if gate else "output",
            f"{params:,}",
            f"{flops['segments'][k]:,}",
            f"{flops['heads'][k]:,}" if gate else "-",
            f"{model.thresholds[k]:.4f}" if gate else "-",
            f"{costs[k]:,.0f} ({costs[k] / flops['baseline']:.0%})",
        )
    console.print(table)
    console.print(f"baseline (un-gated) FLOPs per sample: {flops['baseline']:,}")
    split = model.data_split
    console.print(f"validation split (gates trained without it; calibrate uses it): {split['val_size']} rows "
                  f"of {split['data']}, seed {split['seed']}" if split else
                  "validation split: not recorded (an older checkpoint; give calibrate the --val-size and --seed gate had)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
