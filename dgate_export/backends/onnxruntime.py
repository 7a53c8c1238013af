"""ONNX Runtime backend: the segment's ONNX graph is the artifact; `Runner` wraps an InferenceSession.

Runner options (all optional; `GatedRuntime.load(..., **options)` passes them through):

| option | default | why |
| --- | --- | --- |
| `providers` | `["cpu"]` | execution providers in priority order: `cpu`, `cuda`, `tensorrt` or ORT names (`CUDAExecutionProvider`). A provider that is not installed is an error, never a silent CPU fallback. |
| `provider_options` | `{}` | per-provider options, e.g. `{"cuda": {"device_id": 1}}`. |
| `intra_op_num_threads` | 1 | threads per session; see below. |
| `inter_op_num_threads` | 1 | only used by the parallel execution mode. |
| `execution_mode` | `"sequential"` | `"parallel"` runs independent branches at once; CNN segments are chains. |
| `allow_spinning` | `False` | idle pool threads busy-wait for the next job. A gated run alternates K+1 sessions, and each session's spinning threads steal the cores the next session needs. |
| `graph_optimization_level` | `"all"` | `disable`, `basic`, `extended`, `layout`, `all`. |
| `batch_buckets` | on with `cuda`/`tensorrt`, off on CPU | the runtime pads each segment's batch to the next power of two (padded rows' results dropped), so a session sees at most 9 batch sizes up to 256. |

Why buckets on a GPU: the CUDA provider prepares every convolution once per new input shape (cuDNN
algorithm search: tens of ms), and batch compaction gives every segment a different batch size on
nearly every call. Measured on an H200 (onnxruntime-gpu 1.31.1, ResNet-56 bundle of benchmarks/, batch
256, Fashion-MNIST test): without buckets the gated runtime took 491 ms per batch against 2.3 ms for
the un-gated model (97 ms with `cudnn_conv_algo_search` HEURISTIC). Buckets alone were not enough
(mean 54 ms, median 3.1 ms, and as slow on a second pass over the same batches): the provider evidently
keeps the convolution set-up of the last shape only, so a session whose batch size alternates redoes it.
So on a GPU each batch size gets its own session (made on first use; `GatedRuntime.warmup()` makes them
all), and a session only ever sees one shape: 2.87 ms per batch of 256 (max 3.8 ms), against 58 ms
(max 445 ms) with buckets and one session (`scripts/gpu_check.sh`, benchmarks/results/gpu/). On CPU,
ONNX Runtime has no per-shape cost worth padding for.

Measured on the 2-core development machine while other jobs were running (load ~5): a ResNet-20 chain
of 4 sessions at batch 1 ran 2.0 ms with 1 thread, 2.7 ms with 2 threads and 11.9 ms with 2 spinning
threads; at batch 256, 315, 359 and 826 ms. One thread is the default: it is best for latency and for
many threads calling one runtime; a second thread can only pay for large batches on an idle machine
(`intra_op_num_threads=2`). Spinning stays off: it multiplied the time by up to 6 here.

On CPU, `run` feeds numpy arrays to the session and returns numpy outputs. Per call on a small
segment here (thread CPU time): `InferenceSession.run` 20 us, its underlying binding 13 us (used),
I/O binding rebound per call 30 us (it only wins when the bindings never change), `run_with_ort_values`
76 us. With a CUDA or TensorRT provider, `run` uses I/O binding: outputs not named in `host` stay on
the device as `OrtValue`s that another Runner takes as feeds, so carries never cross the bus.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..errors import UserError

INSTALL_HINT = (
    "Install ONNX Runtime: `pip install onnxruntime` (CPU), or `pip install onnxruntime-gpu` on an NVIDIA "
    "host for the CUDA and TensorRT execution providers (install one of the two, not both)."
)

# Short names users may give in options["providers"].
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_DEVICE_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
# What every backend receives from build / GatedRuntime; meaningless to an ORT session.
_PASSED = {"precision", "max_batch", "opt_batch", "backend_info"}
_KNOWN_OPTIONS = {"providers", "provider_options", "intra_op_num_threads", "inter_op_num_threads",
                  "execution_mode", "allow_spinning", "graph_optimization_level", "batch_buckets"} | _PASSED

# One thread per session by default: a chain of small sessions pays for waking a pool on every
# operator of every call; see the module docstring.
DEFAULT_THREADS = 1


def available() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return False, f"onnxruntime does not import here ({err}). {INSTALL_HINT}"
    return True, ""


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise UserError(f"The onnxruntime backend needs the onnxruntime package ({err}).", INSTALL_HINT) from err
    return onnxruntime


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build(onnx_path: Path, out_dir: Path, options: dict) -> dict:
    """The ONNX graph is what ONNX Runtime runs: check that it loads, and name it as the engine.

    An offline-optimized copy (SessionOptions.optimized_model_filepath) was measured and does not pay:
    it runs no faster and only saves graph optimization at session creation (torchvision ResNet-18:
    0.27-0.39 s -> 0.08 s with an ORT_ENABLE_ALL copy, which is tied to the CPU it was made on;
    -> 0.20 s with a portable ORT_ENABLE_EXTENDED copy).
    """
    onnx_path = Path(onnx_path)
    if onnx_path.parent.resolve() != Path(out_dir).resolve():
        raise ValueError(f"{onnx_path} must already be inside {out_dir}")
    # Loading once proves the graph is valid for this ORT version, so a bad graph fails the build
    # rather than the first run.
    ort = _ort()
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session_options.log_severity_level = 3
    try:
        ort.InferenceSession(str(onnx_path), session_options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own pybind exception types
        raise UserError(f"ONNX Runtime cannot load {onnx_path.name}: {err}",
                        "The exported graph uses something this onnxruntime does not support; "
                        "upgrade onnxruntime or report the model.") from err
    return {"file": onnx_path.name, "sha256": _sha256(onnx_path)}


def finish_build(out_dir: Path, options: dict) -> dict:
    ort = _ort()
    return {"onnxruntime": ort.__version__}


def _providers(options: dict, ort: Any) -> tuple[list[Any], bool]:
    """Resolve options["providers"] into ORT's providers list; True when outputs can live on a GPU."""
    asked = options.get("providers") or ["cpu"]
    if isinstance(asked, str):
        asked = [asked]
    per_provider = options.get("provider_options") or {}
    installed = set(ort.get_available_providers())
    resolved: list[Any] = []
    for name in asked:
        full = PROVIDER_ALIASES.get(str(name).lower(), name)
        if full not in installed:
            raise UserError(
                f"The ONNX Runtime execution provider {full} is not available here "
                f"(installed: {', '.join(sorted(installed))}).",
                "For cuda/tensorrt install onnxruntime-gpu instead of onnxruntime (and a matching CUDA / "
                "TensorRT); or leave `providers` out to run on the CPU.",
            )
        extra = per_provider.get(name) or per_provider.get(full)
        resolved.append((full, dict(extra)) if extra else full)
    names = [p[0] if isinstance(p, tuple) else p for p in resolved]
    on_device = any(n in _DEVICE_PROVIDERS for n in names)
    if on_device:
        _preload_cuda_libraries(ort)
    if "CPUExecutionProvider" not in names:
        # ORT places nodes a GPU provider cannot run on the CPU provider; listing it keeps that explicit.
        resolved.append("CPUExecutionProvider")
    return resolved, on_device


_preloaded = False


def _preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN before the first GPU session, once per process.

    ONNX Runtime documents `preload_dlls()` (onnxruntime-gpu 1.21+) as the way to use CUDA and cuDNN
    installed as pip packages (`nvidia-*`, or torch's copies) when they are not on the library path.
    Best effort: where the libraries come from the system instead (the H200 machine used here: the
    provider started with and without it), it changes nothing; a provider that still fails to start is
    reported by Runner.
    """
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    with contextlib.suppress(Exception):  # the session's own error (checked in Runner) is the clear one
        ort.preload_dlls()


def session_options(options: dict, ort: Any) -> Any:
    unknown = set(options) - _KNOWN_OPTIONS
    if unknown:
        raise UserError(f"Unknown onnxruntime option(s): {', '.join(sorted(unknown))}.",
                        f"Known options: {', '.join(sorted(_KNOWN_OPTIONS - _PASSED))}.")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(options.get("intra_op_num_threads", DEFAULT_THREADS))
    so.inter_op_num_threads = int(options.get("inter_op_num_threads", 1))
    mode = options.get("execution_mode", "sequential")
    level = options.get("graph_optimization_level", "all")
    if mode not in _MODES:
        raise UserError(f"execution_mode {mode!r} is not one of {', '.join(_MODES)}.")
    if level not in _OPT_LEVELS:
        raise UserError(f"graph_optimization_level {level!r} is not one of {', '.join(_OPT_LEVELS)}.")
    so.execution_mode = getattr(ort.ExecutionMode, _MODES[mode])
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[level])
    so.add_session_config_entry("session.intra_op.allow_spinning",
                                "1" if options.get("allow_spinning", False) else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning",
                                "1" if options.get("allow_spinning", False) else "0")
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return so


class Runner:
    """One segment's InferenceSession. `run` is safe from several threads at once (ORT sessions are)."""

    def __init__(self, path: Path, options: dict | None = None):
        options = dict(options or {})
        ort = self._ort = _ort()
        path = Path(path)
        if not path.is_file():
            raise UserError(f"The ONNX Runtime engine {path} does not exist.",
                            "Rebuild the bundle with `dgate-export build`.")
        providers, self._on_device = _providers(options, ort)
        try:
            self._session = ort.InferenceSession(os.fspath(path), session_options(options, ort),
                                                 providers=providers)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"ONNX Runtime cannot load {path}: {err}",
                            "Rebuild the bundle with this onnxruntime version.") from err
        # ORT's InferenceSession.run retries a failed GPU run on the CPU with a print: a silent fallback.
        self._session.disable_fallback()
        # InferenceSession.run re-validates the feed names on every call (7 of 20 us per call on a small
        # segment here); ours come from the graph, so call ORT's binding directly where it exists.
        self._run_direct = getattr(self._session, "_sess", None)
        self.input_names: list[str] = [i.name for i in self._session.get_inputs()]
        self.output_names: list[str] = [o.name for o in self._session.get_outputs()]
        self.providers: list[str] = self._session.get_providers()
        asked = [p[0] if isinstance(p, tuple) else p for p in providers]
        missing = [p for p in asked if p not in self.providers]
        if missing:  # ORT drops a provider whose libraries (CUDA, cuDNN, TensorRT) fail to load, and goes on
            raise UserError(f"ONNX Runtime could not start {', '.join(missing)} for {path.name} "
                            f"(it would run on {', '.join(self.providers)}).",
                            "Check that the CUDA / cuDNN / TensorRT libraries onnxruntime-gpu needs are "
                            "installed and on the library path; or leave `providers` out to run on the CPU.")
        self.batch_buckets = bool(options.get("batch_buckets", self._on_device))  # read by GatedRuntime
        # On a GPU with buckets: one session per batch size (see the module docstring), made on first use.
        self._per_size = self._on_device and self.batch_buckets
        self._sessions: dict[int, Any] = {}  # the first size seen gets the session made here
        self._new_session = lambda: ort.InferenceSession(os.fspath(path), session_options(options, ort),
                                                         providers=providers)
        self._lock = threading.Lock()
        self._device_id = 0
        if self._on_device:
            per_provider = options.get("provider_options") or {}
            cuda = per_provider.get("cuda") or per_provider.get("CUDAExecutionProvider") or {}
            self._device_id = int(cuda.get("device_id", 0))
        # I/O bindings hold per-call state, so each thread gets its own.
        self._local = threading.local()

    def run(self, feeds: dict[str, Any], host: Collection[str] | None = None) -> dict[str, Any]:
        """Run the session; outputs named in `host` (all when None) come back as numpy arrays."""
        if not self._on_device:
            if any(isinstance(v, self._ort.OrtValue) for v in feeds.values()):
                feeds = {k: v.numpy() if isinstance(v, self._ort.OrtValue) else v for k, v in feeds.items()}
            if self._run_direct is not None:
                return dict(zip(self.output_names, self._run_direct.run(self.output_names, feeds, None)))
            return dict(zip(self.output_names, self._session.run(self.output_names, feeds)))
        return self._run_bound(feeds, host)

    def _session_for(self, feeds: dict[str, Any]) -> Any:
        if not self._per_size:
            return self._session
        v = feeds.get("index", next(iter(feeds.values())))  # "index" sets a later segment's batch size
        rows = int(v.shape()[0]) if isinstance(v, self._ort.OrtValue) else len(v)
        session = self._sessions.get(rows)
        if session is None:
            with self._lock:
                session = self._sessions.get(rows)
                if session is None:
                    session = self._new_session() if self._sessions else self._session
                    session.disable_fallback()
                    self._sessions[rows] = session
        return session

    def _run_bound(self, feeds: dict[str, Any], host: Collection[str] | None) -> dict[str, Any]:
        session = self._session_for(feeds)
        bindings = getattr(self._local, "bindings", None)
        if bindings is None:
            bindings = self._local.bindings = {}
        binding = bindings.get(id(session))
        if binding is None:
            binding = bindings[id(session)] = session.io_binding()
        try:
            for name, value in feeds.items():
                if isinstance(value, self._ort.OrtValue):
                    binding.bind_ortvalue_input(name, value)
                else:
                    binding.bind_cpu_input(name, value)
            for name in self.output_names:
                if host is None or name in host:
                    binding.bind_output(name, "cpu")
                else:
                    binding.bind_output(name, "cuda", self._device_id)
            binding.synchronize_inputs()
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            values = binding.get_outputs()
            return {name: (v.numpy() if host is None or name in host else v)
                    for name, v in zip(self.output_names, values)}
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()

    def close(self) -> None:
        """Drop the session (its memory goes when no run is using it); the runner is unusable after."""
        self._session = self._run_direct = None
        self._sessions = {}
