"""Backend registry and interface. A backend is a module that satisfies `Backend`; its `Runner(path,
options)` returns an object that satisfies `Runner` (a class in one backend, a factory in the other: the
same shape either way). Backends receive feeds and return outputs by name without knowing what they mean.

See docs/architecture.md ("Backends"). Modules are imported on first use so that a missing backend
library (TensorRT on most machines) costs nothing until it is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

from ..errors import UserError


class Runner(Protocol):
    """One artifact (segment or baseline) ready to run. Thread-safe: several threads may call `run`."""

    input_names: list[str]
    output_names: list[str]
    batch_buckets: bool  # True: the caller pads every batch to batch_bucket(rows, max_batch)
    fixed_buffers: bool  # True: the runner is a FixedRunner (fixed-address slots per batch bucket)
    cuda_graphs: bool    # True: runs replay CUDA graphs (captured on a slot's or shape's first runs)
    slots_for_one: bool  # True: a FixedRunner whose slots also serve single samples (measured faster)

    def run(self, feeds: dict[str, Any], host: Collection[str] | None = None) -> dict[str, Any]:
        """Outputs by name; those named in `host` (all when None) as numpy arrays, the others may stay in
        the backend's memory and feed another runner of the same backend."""
        ...

    def close(self) -> None: ...


class FixedRunner(Runner, Protocol):
    """A runner with fixed-address slots (ONNX Runtime's fixed_buffers / cuda_graphs options)."""

    def slot(self, rows: int, upstream: Any = None, links: Sequence[tuple[str, str]] = ()) -> Any: ...


class EngineOptions(TypedDict, total=False):
    """What the build passes to every backend's `build` for one engine (plus the backend's own options,
    checked there)."""

    precision: str   # "fp32" | "fp16"
    max_batch: int
    opt_batch: int


class RunnerOptions(TypedDict, total=False):
    """What GatedRuntime.load passes to every backend's `Runner` (plus the user's backend options)."""

    precision: str
    max_batch: int
    backend_info: dict[str, Any]  # the manifest's, when the bundle was built for this backend
    # The input whose leading dimension is the run's batch (later segments get more carry rows than they
    # run) and whose padding rows are zeros (a valid row number, a valid image); default: the first input.
    batch_input: str


class Backend(Protocol):
    """The module interface of a backend (dgate_export.backends.onnxruntime, .tensorrt)."""

    def available(self) -> tuple[bool, str]: ...

    def build(self, onnx_path: Path, out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]: ...

    def finish_build(self, out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]: ...

    def Runner(self, path: Path, options: Mapping[str, Any]) -> Runner: ...


if TYPE_CHECKING:  # mypy checks that both backend modules satisfy the interface
    from . import onnxruntime as _onnxruntime
    from . import tensorrt as _tensorrt

    _checked_onnxruntime: Backend = _onnxruntime
    _checked_tensorrt: Backend = _tensorrt

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


def batch_input(asked: str | None, input_names: Sequence[str], artifact: str) -> str:
    """RunnerOptions' `batch_input` checked against the artifact's inputs; None: its first input."""
    name = asked or input_names[0]
    if name not in input_names:
        raise UserError(f"batch_input {name!r} is not an input of {artifact} (inputs: {', '.join(input_names)}).",
                        "Pass one of its inputs, or leave batch_input out (the first input).")
    return name


def list_backends() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str, *, check: bool = True) -> Backend:
    """Return the backend module `name`; with `check`, refuse it when its library is missing here."""
    if name not in _BACKENDS:
        raise UserError(
            f"Unknown backend {name!r}.", f"Choose one of: {', '.join(_BACKENDS)}."
        )
    module = cast(Backend, importlib.import_module(_BACKENDS[name]))
    if check:
        ok, hint = module.available()
        if not ok:
            raise UserError(f"The {name} backend cannot be used on this machine.", hint)
    return module
