"""The compile side (the `[compile]` extra: torch, torchvision, onnx, onnxscript), and its Python API.

    from dgate_export.compile import attach_gates, train_gates, calibrate_gates, save_model, build_bundle

    gated = attach_gates(my_model, ["layer1", "layer2"], head="grid", data=train_set)
    train_gates(gated, train_set)                 # a torch Dataset, a DataLoader, (x, y) batches, a spec
    calibrate_gates(gated, val_set, test=test_set, target=Target(max_drop=0.01))
    save_model(gated, "model.pt")                 # optional: a bundle builds from the model in memory
    build_bundle(gated, "engines/mine")           # -> a self-contained bundle for dgate_export.runtime

docs/python-api.md describes every function (api.py holds them); the CLI's gate, calibrate and build
commands call the same functions. The names below are imported on first use, so `import
dgate_export.compile` is cheap and `from dgate_export.compile.zoo import register_arch` does not load
onnx.

Everything that needs torch or onnx lives here: the architecture zoo, splitting a backbone at its
exits, gate heads, the gated model, FLOPs, training, checkpoints, the `gate` and `build` pipelines,
ONNX export, int8 quantization and the parity check against torch. It depends on the runtime side
(`dgate_export.contract`, `manifest`, `runtime`, ...), never the reverse: nothing outside this package
imports it at module level, so `pip install dgate-export` (no torch) runs and benchmarks bundles.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module of this package that defines it (or re-exports it from the runtime side)
_EXPORTS = {
    "attach_gates": "api", "train_gates": "api", "calibrate_gates": "api", "save_model": "api",
    "load_model": "api", "bench_bundle": "api", "GateTraining": "api", "Calibrated": "api", "SavedModel": "api",
    "Target": "api", "BenchOptions": "api",
    "GatedModel": "model", "EarlyExit": "model",
    "build_bundle": "build", "BuildOptions": "build",
    "CalibrationData": "quantize",
    "register_arch": "zoo", "list_archs": "zoo",
    "register_head": "heads", "list_heads": "heads", "GateHead": "heads",
    "as_rows": "torch_data",
}
__all__ = [
    "BenchOptions", "BuildOptions", "Calibrated", "CalibrationData", "EarlyExit", "GateHead", "GateTraining",
    "GatedModel", "SavedModel", "Target", "as_rows", "attach_gates", "bench_bundle", "build_bundle",
    "calibrate_gates", "list_archs", "list_heads", "load_model", "register_arch", "register_head", "save_model",
    "train_gates",
]

if TYPE_CHECKING:
    from .api import (
        BenchOptions,
        Calibrated,
        GateTraining,
        SavedModel,
        Target,
        attach_gates,
        bench_bundle,
        calibrate_gates,
        load_model,
        save_model,
        train_gates,
    )
    from .build import BuildOptions, build_bundle
    from .heads import GateHead, list_heads, register_head
    from .model import EarlyExit, GatedModel
    from .quantize import CalibrationData
    from .torch_data import as_rows
    from .zoo import list_archs, register_arch


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
