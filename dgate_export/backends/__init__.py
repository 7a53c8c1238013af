"""Backend registry. A backend is a module with `available()`, `build(...)` and `Runner`.

See docs/architecture.md ("Backends"). Modules are imported on first use so that a missing backend
library (TensorRT on most machines) costs nothing until it is asked for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UserError

_BACKENDS = {
    "onnxruntime": "dgate_export.backends.onnxruntime",
    "tensorrt": "dgate_export.backends.tensorrt",
}


def batch_bucket(rows: int, max_batch: int) -> int:
    """The batch size `rows` is padded to where a backend wants few distinct shapes: the next power of
    two, at most `max_batch` (TensorRT's CUDA graphs, ONNX Runtime's CUDA provider)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return min(1 << (rows - 1).bit_length(), max_batch)


def list_backends() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str, *, check: bool = True) -> ModuleType:
    """Return the backend module `name`; with `check`, refuse it when its library is missing here."""
    if name not in _BACKENDS:
        raise UserError(
            f"Unknown backend {name!r}.", f"Choose one of: {', '.join(_BACKENDS)}."
        )
    module = importlib.import_module(_BACKENDS[name])
    if check:
        ok, hint = module.available()
        if not ok:
            raise UserError(f"The {name} backend cannot be used on this machine.", hint)
    return module
