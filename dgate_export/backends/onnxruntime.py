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
| `fixed_buffers` | off | every (segment, batch bucket) runs from buffers allocated once and bound once by I/O binding (`Runner.slot`); implies `batch_buckets`. Works on every provider (CI tests it on the CPU); what CUDA graphs need. |
| `cuda_graphs` | off | CUDA provider only, implies `fixed_buffers`: the session is made with `enable_cuda_graph` and each slot captures and replays its own graph (`gpu_graph_id`). |

Why these defaults (the figures: benchmarks/README.md, "On a GPU" and "Measurements behind the
defaults"):
- A session per batch size on a GPU: the CUDA provider prepares every convolution per input shape
  (tens of ms) and keeps only the last shape's set-up, while compaction gives a segment a new batch
  size on nearly every call. So `batch_buckets` pads to powers of two and each bucket gets its own
  session (made on first use; `GatedRuntime.warmup()` makes them all). On CPU no per-shape cost is
  worth padding for.
- One thread, no spinning: a gated run alternates K+1 small sessions, whose pool threads (spinning or
  not) fight over the cores the next session needs. `intra_op_num_threads=2` can pay for large
  batches on an idle machine.
- On CPU `run` calls the session's underlying binding directly with numpy arrays (the cheapest call
  measured). With a CUDA or TensorRT provider it uses I/O binding: outputs not named in `host` stay
  on the device as `OrtValue`s that another Runner takes as feeds, so carries never cross the bus.

With `fixed_buffers` (or `cuda_graphs`), `Runner.slot(rows, upstream, links)` gives this thread's
`Slot` for a batch bucket: every buffer allocated once (on the CPU numpy arrays that the OrtValues
wrap, so reads are no copies; on a GPU device OrtValues written with `update_inplace`) and bound once
to an IOBinding; carries are bound to the upstream slot's output buffers. `run()` of host arrays at a
bucket size (the un-gated baseline in `bench`) goes through a slot as well. With `cuda_graphs` the
sessions are made with the CUDA provider's `enable_cuda_graph`, every slot has its own `gpu_graph_id`
(ONNX Runtime captures it on the slot's third run and replays it after), slots run one at a time per
Runner, and runs outside slots pass `gpu_graph_id=-1` (no capture, no replay). Timings: benchmarks/
README.md, "Runtime modes".
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..files import sha256_file
from . import batch_input

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
_PASSED = {"precision", "max_batch", "opt_batch", "backend_info", "batch_input"}
_KNOWN_OPTIONS = {"providers", "provider_options", "intra_op_num_threads", "inter_op_num_threads",
                  "execution_mode", "allow_spinning", "graph_optimization_level", "batch_buckets",
                  "fixed_buffers", "cuda_graphs"} | _PASSED

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


def build(onnx_path: Path, out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ONNX graph is what ONNX Runtime runs: check that it loads, and name it as the engine.

    No offline-optimized copy (SessionOptions.optimized_model_filepath): it runs no faster and only
    saves graph optimization at session creation (benchmarks/README.md, "Measurements behind the defaults").
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
    return {"file": onnx_path.name, "sha256": sha256_file(onnx_path)}


def finish_build(out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    ort = _ort()
    return {"onnxruntime": ort.__version__}


def _providers(options: Mapping[str, Any], ort: Any) -> tuple[list[Any], bool]:
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


def session_options(options: Mapping[str, Any], ort: Any) -> Any:
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

    def __init__(self, path: Path, options: Mapping[str, Any] | None = None):
        options = dict(options or {})
        ort = self._ort = _ort()
        path = self.path = Path(path)
        if not path.is_file():
            raise UserError(f"The ONNX Runtime engine {path} does not exist.",
                            "Rebuild the bundle with `dgate-export build`.")
        self.cuda_graphs = bool(options.get("cuda_graphs", False))
        if self.cuda_graphs:
            options = _with_cuda_graph(options)
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
        self.batch_input: str = batch_input(options.get("batch_input"), self.input_names, path.name)
        self.providers: list[str] = self._session.get_providers()
        asked = [p[0] if isinstance(p, tuple) else p for p in providers]
        missing = [p for p in asked if p not in self.providers]
        if missing:  # ORT drops a provider whose libraries (CUDA, cuDNN, TensorRT) fail to load, and goes on
            raise UserError(f"ONNX Runtime could not start {', '.join(missing)} for {path.name} "
                            f"(it would run on {', '.join(self.providers)}).",
                            "Check that the CUDA / cuDNN / TensorRT libraries onnxruntime-gpu needs are "
                            "installed and on the library path; or leave `providers` out to run on the CPU.")
        # Read by GatedRuntime: fixed buffers exist per bucket, so they imply buckets.
        self.fixed_buffers = self.cuda_graphs or bool(options.get("fixed_buffers", False))
        self.batch_buckets = self.fixed_buffers or bool(options.get("batch_buckets", self._on_device))
        # On the CPU a slot of one row beats a session run (bound once, outputs preallocated): GatedRuntime
        # runs single samples from slots there whatever fixed_buffers says.
        self.slots_for_one = not self._on_device
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
        self._inputs = {i.name: _spec(i, path) for i in self._session.get_inputs()}
        self._outputs = {o.name: _spec(o, path) for o in self._session.get_outputs()}
        self._graph_ids: dict[int, int] = {}  # per session: the last gpu_graph_id given out (ids start at 1)
        self._plain_options = None
        if self.cuda_graphs:  # runs outside the slots must neither capture nor replay a graph
            self._plain_options = ort.RunOptions()
            self._plain_options.add_run_config_entry("gpu_graph_id", "-1")

    def run(self, feeds: dict[str, Any], host: Collection[str] | None = None) -> dict[str, Any]:
        """Run the session; outputs named in `host` (all when None) come back as numpy arrays."""
        if self.fixed_buffers and self._fits_a_slot(feeds):
            slot = self.slot(len(next(iter(feeds.values()))))
            for name, value in feeds.items():
                slot.write(name, value)
            slot.run()
            return {name: slot.read(name).copy() if host is None or name in host else slot.values[name]
                    for name in self.output_names}
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
        v = feeds[self.batch_input]
        return self._session_for_rows(int(v.shape()[0]) if isinstance(v, self._ort.OrtValue) else len(v))

    def _session_for_rows(self, rows: int) -> Any:
        if not self._per_size:
            return self._session
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
            session.run_with_iobinding(binding, self._plain_options)
            binding.synchronize_outputs()
            values = binding.get_outputs()
            return {name: (v.numpy() if host is None or name in host else v)
                    for name, v in zip(self.output_names, values)}
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()

    # ------------------------------------------------------------------------ fixed-address slots

    def _fits_a_slot(self, feeds: dict[str, Any]) -> bool:
        """Host arrays only, all with the same rows, a batch bucket: e.g. the un-gated baseline's input."""
        if set(feeds) != set(self._inputs) or not all(isinstance(v, np.ndarray) for v in feeds.values()):
            return False
        rows = {len(v) for v in feeds.values()}
        return len(rows) == 1 and rows.pop() in _BUCKETS

    def slot(self, rows: int, upstream: Slot | None = None,
             links: Sequence[tuple[str, str]] = ()) -> Slot:
        """This thread's slot of `rows` rows (a batch bucket), made and bound on first use.

        `links` are (input, upstream output) pairs: those inputs are bound to the `upstream` slot's output
        buffers (the previous segment's carries), so a slot exists per (rows, upstream runner, upstream rows).
        Every other input has a buffer of its own that `Slot.write` fills.
        """
        key = (rows, None if upstream is None else (id(upstream.runner), upstream.rows))
        slots = getattr(self._local, "slots", None)
        if slots is None:
            slots = self._local.slots = {}
        slot = slots.get(key)
        if slot is None:
            slot = slots[key] = Slot(self, rows, upstream, links)
        return slot

    def _buffers(self, rows: int) -> dict[str, Any]:
        """This thread's output buffers at `rows`, shared by all its slots of that size."""
        per_rows = getattr(self._local, "buffers", None)
        if per_rows is None:
            per_rows = self._local.buffers = {}
        if rows not in per_rows:
            per_rows[rows] = {name: self._new_buffer(spec, rows) for name, spec in self._outputs.items()}
        return per_rows[rows]

    def _new_buffer(self, spec: tuple[np.dtype, tuple[int, ...]], rows: int) -> tuple[Any, np.ndarray]:
        """(OrtValue, host array) of one tensor at `rows` rows. On the CPU the OrtValue wraps the host
        array (the same memory); on a GPU the host array is the staging copy."""
        dtype, shape = spec
        host = np.zeros((rows, *shape), dtype=dtype)  # zeros: padding rows stay finite numbers
        if not self._on_device:
            return self._ort.OrtValue.ortvalue_from_numpy(host), host
        value = self._ort.OrtValue.ortvalue_from_shape_and_type(host.shape, dtype, "cuda", self._device_id)
        value.update_inplace(host)
        return value, host

    def _next_graph_id(self, session: Any) -> int:
        with self._lock:
            graph_id = self._graph_ids.get(id(session), 0) + 1
            self._graph_ids[id(session)] = graph_id
        return graph_id

    def close(self) -> None:
        """Drop the session (its memory goes when no run is using it); the runner is unusable after."""
        self._session = self._run_direct = None
        self._sessions = {}


_BUCKETS = frozenset(1 << i for i in range(31))
_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _spec(arg: Any, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape without the batch axis) of a session input or output, for preallocated buffers."""
    dims = list(arg.shape)[1:]
    if arg.type not in _ONNX_TYPES or not all(isinstance(d, int) and d >= 0 for d in dims):
        dims = [-1]  # not preallocatable; only a slot (fixed_buffers) refuses it, see Slot
    return np.dtype(_ONNX_TYPES.get(arg.type, np.float32)), tuple(dims)


def _with_cuda_graph(options: dict) -> dict:
    """`options` with the CUDA provider's enable_cuda_graph set; cuda_graphs needs the CUDA provider first."""
    asked = options.get("providers") or ["cpu"]
    asked = [asked] if isinstance(asked, str) else list(asked)
    first = PROVIDER_ALIASES.get(str(asked[0]).lower(), asked[0])
    if first != "CUDAExecutionProvider":
        raise UserError(f"cuda_graphs needs ONNX Runtime's CUDA provider first in `providers`, got {asked}.",
                        "Pass providers=['cuda'] (onnxruntime-gpu), or leave cuda_graphs out.")
    per_provider = dict(options.get("provider_options") or {})
    key = next((k for k in (asked[0], "cuda", "CUDAExecutionProvider") if k in per_provider), asked[0])
    per_provider[key] = {**dict(per_provider.get(key) or {}), "enable_cuda_graph": "1"}
    return {**options, "provider_options": per_provider}


class Slot:
    """One segment at one batch bucket, run from buffers allocated once and bound once (I/O binding).

    Inputs linked to an upstream slot read that slot's output buffers in place (carries never move);
    the other inputs (`input`, `index`) have buffers of their own, filled by `write`. Outputs go to the
    runner's per-thread buffers of this size, which `read` returns as host arrays (on the CPU: the
    buffer itself, no copy; on a GPU: one device-to-host copy). Nothing is allocated per run and no
    shape depends on the data, so on the CUDA provider with `cuda_graphs` each slot captures one CUDA
    graph (its own gpu_graph_id) on its third run and replays it after.
    """

    def __init__(self, runner: Runner, rows: int, upstream: Slot | None, links: Sequence[tuple[str, str]]):
        ort = runner._ort
        self.runner = runner
        self.rows = rows
        self.runs = 0
        self._session = runner._session_for_rows(rows)
        self._on_device = runner._on_device
        self._lock = runner._lock if runner.cuda_graphs else None  # one capture / replay at a time
        self.upstream = upstream  # kept alive: its buffers are bound here
        linked = dict(links)
        self.values: dict[str, Any] = {}  # own buffers: inputs that are not linked, and outputs
        self._host: dict[str, np.ndarray] = {}  # CPU: the buffers; GPU: staging for writes
        self._written: set[str] = set()
        binding = self._binding = self._session.io_binding()
        for name, spec in runner._inputs.items():
            if name in linked:
                if upstream is None:
                    raise ValueError(f"input {name} is linked but no upstream slot was given")
                binding.bind_ortvalue_input(name, upstream.values[linked[name]])
                continue
            self._check(name, spec)
            value, host = runner._new_buffer(spec, rows)
            self.values[name] = value
            self._host[name] = host
            binding.bind_ortvalue_input(name, value)
        for name, (value, host) in runner._buffers(rows).items():
            self._check(name, runner._outputs[name])
            binding.bind_ortvalue_output(name, value)
            self.values[name] = value
            self._host[name] = host
        self._options = None
        if runner.cuda_graphs:
            self._options = ort.RunOptions()
            self._options.add_run_config_entry("gpu_graph_id", str(runner._next_graph_id(self._session)))

    def _check(self, name: str, spec: tuple[np.dtype, tuple[int, ...]]) -> None:
        if -1 in spec[1]:
            raise UserError(f"{name} of {self.runner.path.name} has a shape that depends on more than the batch "
                            "size, so fixed_buffers / cuda_graphs cannot preallocate it.",
                            "Leave fixed_buffers and cuda_graphs off for this bundle.")

    def write(self, name: str, rows: np.ndarray) -> None:
        """Copy `rows` (at most self.rows of them) into input `name`; the rows after them are padding: an
        index is padded with 0 (a valid row), other inputs keep earlier (finite) rows."""
        buf = self._host[name]
        n = len(rows)
        buf[:n] = rows
        if name == self.runner.batch_input and n < self.rows:
            buf[n:] = 0
        if self._on_device:
            self.values[name].update_inplace(buf)

    def run(self) -> None:
        if self._lock is None:
            self._session.run_with_iobinding(self._binding, self._options)
        else:
            with self._lock:
                self._session.run_with_iobinding(self._binding, self._options)
        self.runs += 1

    def read(self, name: str) -> np.ndarray:
        """Output `name` of the last run, all self.rows rows, as a host array. On the CPU it is the buffer
        itself: valid until the next run of a slot of this runner, size and thread."""
        if not self._on_device:
            return self._host[name]
        return self.values[name].numpy()
