"""The TensorRT backend's plain logic: options, the bundle compatibility rule, device-array parsing.

Nothing here imports TensorRT or CUDA, so all of it runs (and is tested) on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError

TIMING_CACHE_FILE = "timing.cache"
ENGINE_SUFFIX = ".engine"

INSTALL_HINT = (
    "pip install 'dgate-export[tensorrt]' on a machine with an NVIDIA GPU and driver "
    "(it brings TensorRT 10 or 11 and cuda-python), then check with "
    "`python -c \"import tensorrt, cuda.bindings\"`."
)
REBUILD_HINT = "Rebuild the bundle on this machine: `dgate-export build ... --backend tensorrt --force`."

# Hardware-compatibility levels this backend builds with, as recorded in backend_info.
HW_NONE = "NONE"
HW_AMPERE_PLUS = "AMPERE_PLUS"
HW_SAME_CC = "SAME_COMPUTE_CAPABILITY"


# ------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BuildSettings:
    precision: str  # "fp32" | "fp16": the graph's own float type; "int8": a QDQ graph (explicit quantization)
    max_batch: int
    opt_batch: int  # the batch TensorRT tunes its kernels for
    workspace_mb: int | None  # None: TensorRT's default (the GPU's memory)
    timing_cache: Path | None  # an existing cache to start from
    hardware_compatible: bool  # AMPERE_PLUS engines: run on any Ampere or newer GPU
    tf32: bool  # allow TF32 math for fp32 graphs (faster on Ampere+, ~1e-3 relative error)

    @property
    def hardware_level(self) -> str:
        return HW_AMPERE_PLUS if self.hardware_compatible else HW_NONE


@dataclass(frozen=True)
class RunSettings:
    cuda_graphs: bool
    cuda_graph_limit: int  # graphs kept per runner and thread; beyond it, plain execution
    share_memory: bool  # one activation scratch per thread for every engine (user-managed memory)
    backend_info: Mapping[str, Any] | None  # the manifest's backend_info, checked against this machine
    batch_input: str | None  # the input that sets the batch size (RunnerOptions); None: the first input


BUILD_OPTIONS = frozenset({"precision", "max_batch", "opt_batch", "workspace_mb", "timing_cache",
                           "hardware_compatible", "tf32"})
# "precision" and "max_batch" come from the manifest (GatedRuntime passes them); the engine itself knows both.
RUN_OPTIONS = frozenset({"precision", "max_batch", "backend_info", "cuda_graphs", "cuda_graph_limit",
                         "share_memory", "batch_input"})


def _check_known(options: Mapping[str, Any], known: frozenset[str], what: str) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"Unknown TensorRT {what} option(s): {', '.join(unknown)}.",
                        f"Known {what} options: {', '.join(sorted(known))} (see docs/tensorrt.md).")


def _int_option(options: Mapping[str, Any], key: str, flag: str, default: int | None) -> int | None:
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"The TensorRT option {key} must be a whole number, not {value!r}.",
                        f"Pass an integer to {flag}.")
    return int(value)


def build_settings(options: Mapping[str, Any]) -> BuildSettings:
    """Read and check the build options; every bad value is a UserError naming the CLI flag."""
    _check_known(options, BUILD_OPTIONS, "build")
    precision = options.get("precision", "fp32")
    if precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"Unknown precision {precision!r} for the TensorRT backend.",
                        "Choose --precision fp32, fp16 or int8.")
    max_batch = _int_option(options, "max_batch", "--max-batch", None)
    if max_batch is None or max_batch < 1:
        raise UserError(f"The maximum batch must be at least 1, not {max_batch!r}.",
                        "Pass --max-batch N with N >= 1.")
    opt_batch = _int_option(options, "opt_batch", "--opt-batch", max_batch)
    assert opt_batch is not None
    if not 1 <= opt_batch <= max_batch:
        raise UserError(f"The batch to optimize for ({opt_batch}) must lie in 1..{max_batch} (the maximum batch).",
                        "Pass --opt-batch between 1 and --max-batch, or leave it out to use the maximum.")
    workspace_mb = _int_option(options, "workspace_mb", "--workspace-mb", None)
    if workspace_mb is not None and workspace_mb < 1:
        raise UserError(f"The TensorRT workspace must be at least 1 MiB, not {workspace_mb}.",
                        "Pass --workspace-mb with a positive number of MiB, or leave it out.")
    cache = options.get("timing_cache")
    return BuildSettings(
        precision=str(precision),
        max_batch=max_batch,
        opt_batch=opt_batch,
        workspace_mb=workspace_mb,
        timing_cache=Path(cache) if cache else None,
        hardware_compatible=bool(options.get("hardware_compatible", False)),
        tf32=bool(options.get("tf32", False)),
    )


def run_settings(options: Mapping[str, Any] | None) -> RunSettings:
    options = options or {}
    _check_known(options, RUN_OPTIONS, "runner")
    limit = _int_option(options, "cuda_graph_limit", "cuda_graph_limit", 64)
    assert limit is not None
    if limit < 1:
        raise UserError(f"cuda_graph_limit must be at least 1, not {limit}.", "Pass a positive number.")
    info = options.get("backend_info")
    if info is not None and not isinstance(info, Mapping):
        raise UserError("The manifest's backend_info must be a JSON object.", REBUILD_HINT)
    return RunSettings(
        cuda_graphs=bool(options.get("cuda_graphs", False)),
        cuda_graph_limit=limit,
        share_memory=bool(options.get("share_memory", True)),
        backend_info=info,
        batch_input=options.get("batch_input"),
    )


# ------------------------------------------------------------------------------------- compatibility


def _capability(value: Any) -> tuple[int, int] | None:
    try:
        major, minor = str(value).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def check_compatible(recorded: Mapping[str, Any], here: Mapping[str, Any], what: str) -> None:
    """Refuse engines that this machine cannot (or should not) run, before TensorRT tries.

    `recorded` is the manifest's backend_info (written by `finish_build`); `here` has the same
    "tensorrt_version" and "gpu" {"name", "compute_capability"} keys for this machine. A serialized
    engine loads only in the TensorRT version that built it. Its kernels are chosen for one GPU unless it
    was built hardware-compatible: AMPERE_PLUS runs on compute capability 8.0 or newer, and
    SAME_COMPUTE_CAPABILITY on the same compute capability.
    """
    try:
        built_version = str(recorded["tensorrt_version"])
        built_gpu = recorded["gpu"]
        built_name = str(built_gpu["name"])
        built_cc = str(built_gpu["compute_capability"])
    except (KeyError, TypeError) as err:
        raise UserError(f"The manifest's backend_info lacks {err} for {what}, so this machine cannot be "
                        "checked against the one that built it.", REBUILD_HINT) from err
    level = str(recorded.get("hardware_compatibility", HW_NONE))
    here_version = str(here["tensorrt_version"])
    here_name = str(here["gpu"]["name"])
    here_cc = str(here["gpu"]["compute_capability"])

    if built_version != here_version:
        raise UserError(
            f"{what} was built with TensorRT {built_version}, and this machine has TensorRT {here_version}: "
            "a TensorRT engine loads only in the version that built it.",
            f"{REBUILD_HINT} Or install TensorRT {built_version} here.")
    built = f"{built_name} (compute capability {built_cc})"
    this = f"{here_name} (compute capability {here_cc})"
    if level == HW_NONE:
        if (built_name, built_cc) != (here_name, here_cc):
            raise UserError(
                f"{what} was built for the GPU {built}; this machine has {this}. TensorRT engines are tuned "
                "for the GPU that built them and may fail or run slowly on another.",
                f"{REBUILD_HINT} To build once for several GPUs (Ampere or newer), add --hardware-compatible.")
    elif level == HW_AMPERE_PLUS:
        cc = _capability(here_cc)
        if cc is None or cc < (8, 0):
            raise UserError(
                f"{what} was built hardware-compatible for Ampere or newer GPUs (compute capability 8.0+); "
                f"this machine has {this}.", REBUILD_HINT)
    elif level == HW_SAME_CC:
        if built_cc != here_cc:
            raise UserError(f"{what} was built for GPUs of compute capability {built_cc}; this machine has "
                            f"{this}.", REBUILD_HINT)
    else:
        raise UserError(f"{what} records an unknown hardware-compatibility level {level!r}.", REBUILD_HINT)


# ------------------------------------------------------------------------------------- device arrays


@dataclass(frozen=True)
class CudaArray:
    """What this backend needs from an object exposing `__cuda_array_interface__` (version 2 or 3)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    stream: int | None  # the producer's stream to wait for (CAI v3), None when none is named


def parse_cuda_array(value: Any, what: str) -> CudaArray:
    """Read `value.__cuda_array_interface__`; refuse what cannot be bound as a dense tensor."""
    cai = value.__cuda_array_interface__
    try:
        shape = tuple(int(d) for d in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        ptr = int(cai["data"][0])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{what} has a malformed __cuda_array_interface__ ({err}).",
                        "Pass a numpy array, a CUDA tensor (torch, CuPy) or an output of a previous run.") from err
    if cai.get("mask") is not None:
        raise UserError(f"{what} is a masked device array.", "Pass a dense array.")
    strides = cai.get("strides")
    if strides is not None and tuple(int(s) for s in strides) != contiguous_strides(shape, dtype.itemsize):
        raise UserError(f"{what} is not C-contiguous on the device (strides {tuple(strides)}).",
                        "Make it contiguous first (torch: .contiguous(); CuPy: cupy.ascontiguousarray).")
    stream = cai.get("stream")
    return CudaArray(ptr=ptr, shape=shape, dtype=dtype, stream=None if stream is None else int(stream))


def contiguous_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = []
    step = itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def check_feed_shape(shape: tuple[int, ...], expected: tuple[int, ...], max_batch: int, what: str) -> None:
    """`expected` is the engine's shape, -1 for the dynamic batch dimension."""
    if len(shape) != len(expected) or any(e >= 0 and s != e for s, e in zip(shape, expected)):
        want = "[" + ", ".join("N" if e < 0 else str(e) for e in expected) + "]"
        raise UserError(f"{what} has shape {list(shape)}; the engine takes {want}.",
                        "Feed the tensors this segment's manifest entry lists, with their shapes.")
    if expected and expected[0] < 0 and not 1 <= shape[0] <= max_batch:
        raise UserError(f"{what} has {shape[0]} rows; the engine takes 1..{max_batch}.",
                        "Split the batch, or rebuild the bundle with a larger --max-batch.")
