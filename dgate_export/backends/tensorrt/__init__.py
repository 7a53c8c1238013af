"""The TensorRT backend: one engine per segment, run with per-thread CUDA streams and buffers.

The backend interface (docs/architecture.md, "Backends"):

- `available()` -> (ok, install hint)
- `build(onnx_path, out_dir, options)` -> the manifest's engine entry (builder.py)
- `finish_build(out_dir, options)` -> the manifest's backend_info (builder.py)
- `Runner(path, options)` -> an object with `input_names`, `output_names`, `run(feeds, host)` and
  `close()` (runner.py)

Build options: "precision" ("fp32" | "fp16" | "int8": a QDQ graph), "max_batch", "opt_batch", "workspace_mb",
"timing_cache" (path of an existing cache to start from), "hardware_compatible", "tf32".
Runner options: "backend_info" (the manifest's, checked against this machine), "cuda_graphs",
"cuda_graph_limit", "share_memory". See docs/tensorrt.md.

TensorRT and cuda-python are imported only inside these functions, so this package imports (and
`available()` answers) on machines without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import UserError
from .common import INSTALL_HINT, TIMING_CACHE_FILE

if TYPE_CHECKING:
    from .runner import Runner as TensorRTRunner

__all__ = ["INSTALL_HINT", "TIMING_CACHE_FILE", "Runner", "available", "build", "finish_build"]

MIN_TENSORRT = 10


def available() -> tuple[bool, str]:
    """Whether TensorRT (10 or 11), cuda-python and a CUDA GPU are usable here; if not, why and how."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as err:
        return False, f"TensorRT is not installed here ({err}). {INSTALL_HINT}"
    if not hasattr(trt, "Builder"):
        # `import tensorrt` also succeeds on type stubs or a placeholder package without the library.
        return False, f"The 'tensorrt' package here has no TensorRT library (stubs or a placeholder). {INSTALL_HINT}"
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT:
        return False, f"TensorRT {version} is too old: this backend needs TensorRT 10 or 11. {INSTALL_HINT}"
    try:
        from . import cuda
    except ImportError as err:
        return False, f"cuda-python is not installed here ({err}). {INSTALL_HINT}"
    count, why = cuda.device_count()
    if count < 1:
        return False, f"TensorRT is installed, but no CUDA GPU is usable here ({why}). {INSTALL_HINT}"
    return True, ""


def _require() -> None:
    ok, hint = available()
    if not ok:
        raise UserError("The tensorrt backend cannot be used on this machine.", hint)


def build(onnx_path: Path, out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """Build `out_dir/<segment>.engine` from one segment's ONNX; return its manifest engine entry."""
    _require()
    from .builder import build_engine

    return build_engine(Path(onnx_path), Path(out_dir), options)


def finish_build(out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's backend_info: TensorRT version, GPU, hardware compatibility, timing cache."""
    _require()
    from .builder import finish_build as finish

    return finish(Path(out_dir), options)


def Runner(path: str | Path, options: Mapping[str, Any] | None = None) -> TensorRTRunner:
    """Load one engine; named like the class it returns (runner.Runner), as the backend interface says."""
    _require()
    from .runner import Runner as TensorRTRunner

    return TensorRTRunner(path, options)
