"""Run one segment's TensorRT engine with TensorRT's current API and cuda-python memory.

Tensor names, `set_input_shape`, `set_tensor_address` and `execute_async_v3` on one CUDA stream (its
result is checked). Everything else is the backend interface of docs/architecture.md:

- Thread safety: per thread, each Runner keeps its own execution context(s), buffers and CUDA graphs
  (`threading.local`); no lock is taken on the run path. Every thread has one CUDA stream, shared by
  all TensorRT Runners it calls, so the segments a thread chains are ordered on that stream without
  host syncs in between.
- Memory: device buffers and pinned host buffers are allocated once per thread at the maximum batch
  and reused. Activation memory is user-managed: one scratch allocation per thread, sized by the
  largest engine loaded, serves every engine (they run one after another on the thread's stream).
- Feeds: numpy arrays are copied through pinned memory; objects exposing `__cuda_array_interface__`
  (torch/CuPy CUDA tensors, or this backend's own `DeviceArray` outputs) are bound without a copy.
  Outputs named in `host` come back as numpy arrays (one copy into pinned memory, one stream sync);
  the others stay on the GPU as `DeviceArray`s, valid until the same Runner runs again in that thread.
- CUDA graphs (options["cuda_graphs"]): one graph per input shape and address, with the batch padded
  to a power-of-two bucket so that few graphs serve all batch sizes. A capture that fails falls back to
  plain execution for that shape, with a warning.

Imports tensorrt at module level: import this module only after `available()` said TensorRT is here.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorrt as trt

from ...errors import UserError
from .. import batch_bucket, batch_input
from . import cuda
from ._log import CapturingLogger
from .common import (
    REBUILD_HINT,
    RunSettings,
    check_compatible,
    check_feed_shape,
    parse_cuda_array,
    run_settings,
)

if TYPE_CHECKING:
    from typing_extensions import Self

# --------------------------------------------------------------------------------- per-thread lanes


class _Lane:
    """One thread's CUDA stream and activation scratch, shared by every Runner the thread calls."""

    def __init__(self) -> None:
        self.stream = cuda.Stream()
        self.scratch: cuda.DeviceBuffer | None = None
        self.generation = 0  # bumps when the scratch moves: graphs holding the old address are stale
        self.closed = False

    def scratch_for(self, need: int) -> tuple[int, int]:
        """(address, size) of a scratch of at least `need` bytes, grown to the largest engine loaded."""
        if need <= 0:
            return 0, 0
        if self.scratch is None or self.scratch.nbytes < need:
            size = max(need, _shared.max_scratch)
            if self.scratch is not None:
                self.stream.synchronize()  # queued work may still use the old scratch
                self.scratch.free()
            self.scratch = cuda.DeviceBuffer(size)
            self.generation += 1
        return self.scratch.ptr, self.scratch.nbytes

    def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stream.synchronize()
        if self.scratch is not None:
            self.scratch.free()
        self.stream.destroy()


class _Shared:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.local = threading.local()
        self.lanes: list[_Lane] = []
        self.max_scratch = 0  # the largest activation memory of the engines loaded now
        self.live = 0  # open Runners; the lanes are released when the last one closes


_shared = _Shared()


def _lane() -> _Lane:
    lane: _Lane | None = getattr(_shared.local, "lane", None)
    if lane is None or lane.closed:
        lane = _Lane()
        with _shared.lock:
            _shared.lanes.append(lane)
        _shared.local.lane = lane
    return lane


def _retain(scratch: int) -> None:
    with _shared.lock:
        _shared.live += 1
        _shared.max_scratch = max(_shared.max_scratch, scratch)


def _release() -> None:
    with _shared.lock:
        _shared.live -= 1
        if _shared.live > 0:
            return
        lanes, _shared.lanes = _shared.lanes, []
        _shared.max_scratch = 0
    for lane in lanes:
        lane.release()


# ----------------------------------------------------------------------------------------- helpers


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _nbytes(shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _device_memory_size(engine: trt.ICudaEngine) -> int:
    # The v2 size (10.1+, the only one in 11) includes weight-streaming scratch; 10.0 has only v1.
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


_DEVICE_MEMORY = "device_memory"


def _set_device_memory(context: trt.IExecutionContext, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # 10.1+ and 11
        context.set_device_memory(ptr, size)
    else:  # 10.0: the property setter, absent from the 10.13 stubs (hence setattr)
        setattr(context, _DEVICE_MEMORY, ptr)


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]  # the engine's shape, -1 for the dynamic batch dimension
    capacity: int  # bytes at the maximum batch


@dataclass
class _Feed:
    spec: _Spec
    shape: tuple[int, ...]
    host: np.ndarray[Any, Any] | None  # a host feed, copied through pinned memory
    ptr: int  # a device feed's address
    capacity_rows: int  # rows the device memory behind ptr holds (for padding under CUDA graphs)
    stream: int | None  # the device feed's producer stream, to wait for


@dataclass
class _Graph:
    graph: cuda.Graph
    context: trt.IExecutionContext  # the graph's own context: its state must not change after capture
    out_shapes: dict[str, tuple[int, ...]]


class _State:
    """One Runner's resources in one thread."""

    def __init__(self, lane: _Lane, context: trt.IExecutionContext, outputs: list[_Spec]):
        self.lane = lane
        self.context = context
        self.context_scratch = -1  # the scratch address last given to `context`
        self.shapes: dict[str, tuple[int, ...]] = {}  # input shapes last set on `context`
        self.addresses: dict[str, int] = {}  # tensor addresses last set on `context`
        self.in_dev: dict[str, cuda.DeviceBuffer] = {}
        self.in_host: dict[str, cuda.PinnedBuffer] = {}
        self.out_host: dict[str, cuda.PinnedBuffer] = {}
        self.out_dev = {spec.name: cuda.DeviceBuffer(spec.capacity) for spec in outputs}
        self.h2d_done = cuda.Event()  # pinned input buffers may be rewritten once this has passed
        self.h2d_pending = False
        self.wait_event = cuda.Event()  # orders this thread's stream after a device feed's producer
        self.epoch = 0  # bumps every run: DeviceArrays from earlier runs are stale
        self.graphs: dict[tuple[Any, ...], _Graph] = {}
        self.graph_failed: set[tuple[Any, ...]] = set()
        self.graph_generation = lane.generation
        self.plain_runs = 0
        self.graph_launches = 0
        self.closed = False

    def device_in(self, spec: _Spec) -> cuda.DeviceBuffer:
        if spec.name not in self.in_dev:
            self.in_dev[spec.name] = cuda.DeviceBuffer(spec.capacity)
        return self.in_dev[spec.name]

    def pinned(self, table: dict[str, cuda.PinnedBuffer], spec: _Spec) -> cuda.PinnedBuffer:
        if spec.name not in table:
            table[spec.name] = cuda.PinnedBuffer(spec.capacity)
        return table[spec.name]

    def drop_graphs(self) -> None:
        self.lane.stream.synchronize()
        for entry in self.graphs.values():
            entry.graph.destroy()
        self.graphs.clear()

    def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.drop_graphs()  # synchronizes the stream first: nothing may still use these buffers
        del self.context
        for buf in [*self.in_dev.values(), *self.out_dev.values()]:
            buf.free()
        for pinned in [*self.in_host.values(), *self.out_host.values()]:
            pinned.free()
        self.h2d_done.destroy()
        self.wait_event.destroy()


class DeviceArray:
    """A run's output left on the GPU, bindable by any consumer of `__cuda_array_interface__`.

    It points into its Runner's per-thread output buffer: valid until that Runner runs again in the
    same thread (`valid` says so). `numpy()` copies it to the host.
    """

    __slots__ = ("_epoch", "_state", "capacity_rows", "dtype", "ptr", "shape")

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype[Any], state: _State,
                 capacity_rows: int):
        self.ptr = ptr
        self.shape = shape
        self.dtype = dtype
        self.capacity_rows = capacity_rows
        self._state = state
        self._epoch = state.epoch

    @property
    def valid(self) -> bool:
        return not self._state.closed and self._state.epoch == self._epoch

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": self._state.lane.stream.address}

    def numpy(self) -> np.ndarray[Any, Any]:
        if not self.valid:
            raise UserError("This TensorRT output was overwritten by a later run of its Runner (or the "
                            "Runner was closed).", "Copy it (numpy()) before running the Runner again.")
        out = np.empty(self.shape, dtype=self.dtype)
        stream = self._state.lane.stream
        cuda.copy_to_host(out.ctypes.data, self.ptr, out.nbytes, stream)
        stream.synchronize()
        return out

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, valid={self.valid})"


# ------------------------------------------------------------------------------------------ Runner


class Runner:
    """One TensorRT engine (a segment of a bundle). See the module docstring for the contract."""

    def __init__(self, path: str | Path, options: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.settings: RunSettings = run_settings(options)
        if not self.path.is_file():
            raise UserError(f"The TensorRT engine {self.path} does not exist.",
                            "Check the bundle directory, or rebuild it with `dgate-export build`.")
        if self.settings.backend_info is not None:
            here = {"tensorrt_version": trt.__version__, "gpu": cuda.device_info()}
            check_compatible(self.settings.backend_info, here, f"The bundle holding {self.path.name}")
        self._logger = CapturingLogger()
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise UserError(f"TensorRT {trt.__version__} could not load the engine {self.path}. "
                            f"{self._logger.recent()}", REBUILD_HINT)
        self._engine = engine
        self._read_io()
        # USER_MANAGED exists from TensorRT 10.0 on: contexts take activation memory from us.
        self.memory_sharing = self.settings.share_memory
        self._strategy = (trt.ExecutionContextAllocationStrategy.USER_MANAGED if self.memory_sharing
                          else trt.ExecutionContextAllocationStrategy.STATIC)
        self._scratch_need = _device_memory_size(engine) if self.memory_sharing else 0
        self._drive = batch_input(self.settings.batch_input, self.input_names, self.path.name)
        self._can_pad = self._probe_outputs()
        self.cuda_graphs = self.settings.cuda_graphs
        # Read by GatedRuntime: under CUDA graphs it pads every batch to a bucket itself (so a graph per
        # bucket serves every size) and decides per gate whether to compact (its bucket_times table).
        self.batch_buckets = self.cuda_graphs
        self.fixed_buffers = False  # the interface's slots are ONNX Runtime's; TensorRT binds its own buffers
        self.slots_for_one = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self._states: list[_State] = []
        self._warned: set[str] = set()
        self._closed = False
        _retain(self._scratch_need)

    # -------------------------------------------------------------------------------- engine layout

    def _read_io(self) -> None:
        engine = self._engine
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self._inputs: list[_Spec] = []
        self._outputs: list[_Spec] = []
        max_rows = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_location(name) != trt.TensorLocation.DEVICE or \
                    engine.get_tensor_format(name) != trt.TensorFormat.LINEAR:
                raise UserError(f"Tensor {name} of {self.path.name} is not a linear device tensor; "
                                "dgate-export's engines never have such tensors.", REBUILD_HINT)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = _dims(engine.get_tensor_shape(name))
            if not shape:
                raise UserError(f"Tensor {name} of {self.path.name} is a scalar; dgate-export's engines "
                                "take and give batched tensors only.", REBUILD_HINT)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                top = _dims(engine.get_tensor_profile_shape(name, 0)[2])
                if shape and shape[0] < 0:
                    max_rows.append(top[0])
                self.input_names.append(name)
                self._inputs.append(_Spec(name, dtype, shape, _nbytes(top, dtype)))
            else:
                self.output_names.append(name)
                self._outputs.append(_Spec(name, dtype, shape, 0))  # capacity: _probe_outputs
        if not self._inputs:
            raise UserError(f"The engine {self.path.name} has no inputs.", REBUILD_HINT)
        self.max_batch = min(max_rows) if max_rows else 1

    def _new_context(self) -> trt.IExecutionContext:
        context = self._engine.create_execution_context(self._strategy)
        if context is None:
            raise cuda.CudaError(f"TensorRT could not create an execution context for {self.path.name}. "
                                 f"{self._logger.recent()}")
        return context

    def _probe_outputs(self) -> bool:
        """Size the output buffers at the maximum batch; say whether batch padding is safe.

        Padding a batch (for CUDA graph buckets) is safe when every output's first dimension follows the
        batch of the driving input (`index`, or the first input) and nothing else does.
        """
        context = self._new_context()  # user-managed: no activation memory is allocated for it

        def output_shapes(rows: dict[str, int]) -> dict[str, tuple[int, ...]]:
            for spec in self._inputs:
                shape = spec.shape if spec.shape[0] >= 0 else (rows[spec.name], *spec.shape[1:])
                if not context.set_input_shape(spec.name, shape):
                    raise cuda.CudaError(f"TensorRT refused shape {shape} for {spec.name} of "
                                         f"{self.path.name}. {self._logger.recent()}")
            return {spec.name: _dims(context.get_tensor_shape(spec.name)) for spec in self._outputs}

        top = output_shapes({spec.name: self.max_batch for spec in self._inputs})
        for i, spec in enumerate(self._outputs):
            if any(d < 0 for d in top[spec.name]):
                raise UserError(f"Output {spec.name} of {self.path.name} has a data-dependent shape.",
                                REBUILD_HINT)
            self._outputs[i] = _Spec(spec.name, spec.dtype, spec.shape, _nbytes(top[spec.name], spec.dtype))
        can_pad = all(spec.shape and spec.shape[0] < 0 for spec in self._outputs)
        if can_pad and self.max_batch > 1:
            for drive_rows, other_rows in ((1, self.max_batch), (self.max_batch, 1)):
                rows = {spec.name: other_rows for spec in self._inputs}
                rows[self._drive] = drive_rows
                can_pad = can_pad and all(s[0] == drive_rows for s in output_shapes(rows).values())
        return can_pad

    # ------------------------------------------------------------------------------------ the run

    def _state(self) -> _State:
        state: _State | None = getattr(self._local, "state", None)
        if state is None:
            with self._lock:
                if self._closed:
                    raise UserError(f"The TensorRT runner for {self.path.name} is closed.",
                                    "Create a new Runner.")
                state = _State(_lane(), self._new_context(), self._outputs)
                self._states.append(state)
            self._local.state = state
        return state

    def _feeds(self, feeds: Mapping[str, Any], state: _State) -> list[_Feed]:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise UserError(f"{self.path.name} takes inputs {self.input_names}; got {sorted(feeds)}.",
                            "Feed exactly the inputs the segment's manifest entry lists.")
        placed = []
        for spec in self._inputs:
            value = feeds[spec.name]
            what = f"Input {spec.name} of {self.path.name}"
            if hasattr(value, "__cuda_array_interface__"):
                rows_held = None
                if isinstance(value, DeviceArray):
                    if not value.valid:
                        raise UserError(f"{what} is a TensorRT output that a later run overwrote.",
                                        "Feed outputs to the next segment before running their Runner again.")
                    if value._state is state:
                        raise UserError(f"{what} is an output of this same Runner: it would be overwritten "
                                        "while it is read.", "Copy it first (numpy()).")
                    rows_held = value.capacity_rows
                array = parse_cuda_array(value, what)
                if array.dtype != spec.dtype:
                    raise UserError(f"{what} is {array.dtype}; the engine takes {spec.dtype}.",
                                    "Convert it on the device first.")
                check_feed_shape(array.shape, spec.shape, self.max_batch, what)
                placed.append(_Feed(spec, array.shape, None, array.ptr,
                                    rows_held if rows_held is not None else array.shape[0], array.stream))
            else:
                host = np.asarray(value)
                # Row numbers (`index`) may come as any integer type; floats must match exactly.
                if host.dtype != spec.dtype and not (host.dtype.kind in "iu" and spec.dtype.kind in "iu"):
                    raise UserError(f"{what} is {host.dtype}; the engine takes {spec.dtype}.",
                                    f"Pass a {spec.dtype} array (the bundle's precision decides it).")
                check_feed_shape(host.shape, spec.shape, self.max_batch, what)
                placed.append(_Feed(spec, host.shape, host, 0, host.shape[0] if host.ndim else 1, None))
        return placed

    def _shapes(self, placed: list[_Feed]) -> dict[str, tuple[int, ...]]:
        """Input shapes to run at: exact, or padded to batch buckets under CUDA graphs."""
        shapes = {}
        for feed in placed:
            shape = feed.shape
            if self.cuda_graphs and self._can_pad and feed.spec.shape and feed.spec.shape[0] < 0:
                bucket = batch_bucket(shape[0], self.max_batch)
                # Pad only memory we own (zeroed rows) or our own outputs (finite rows, never gathered).
                if feed.host is not None or (feed.capacity_rows >= bucket and feed.spec.dtype.kind == "f"
                                             and self._drive != feed.spec.name):
                    shape = (bucket, *shape[1:])
            shapes[feed.spec.name] = shape
        return shapes

    def _place(self, placed: list[_Feed], shapes: dict[str, tuple[int, ...]], state: _State) -> dict[str, int]:
        """Copy host feeds to the device (padding rows zeroed); order device feeds after their producer."""
        stream = state.lane.stream
        addresses = {}
        if state.h2d_pending and any(feed.host is not None for feed in placed):
            state.h2d_done.synchronize()  # the previous run's copies out of pinned memory are done
        copied = False
        for feed in placed:
            spec = feed.spec
            if feed.host is None:
                if feed.stream is not None and feed.stream != stream.address:
                    state.wait_event.record(feed.stream)
                    stream.wait_for(state.wait_event)
                addresses[spec.name] = feed.ptr
                continue
            pinned = state.pinned(state.in_host, spec)
            view = pinned.view(spec.dtype, shapes[spec.name])
            rows = feed.shape[0] if feed.shape else 1
            view[:rows] = feed.host
            view[rows:] = 0  # padding rows: zeros, so `index` padding gathers row 0
            device = state.device_in(spec)
            cuda.copy_to_device(device.ptr, pinned.ptr, view.nbytes, stream)
            addresses[spec.name] = device.ptr
            copied = True
        if copied:
            state.h2d_done.record(stream)
            state.h2d_pending = True
        return addresses

    def _bind(self, context: trt.IExecutionContext, state: _State | None, shapes: dict[str, tuple[int, ...]],
              addresses: dict[str, int], out_dev: dict[str, cuda.DeviceBuffer]) -> None:
        """Set shapes and addresses on `context`; with `state`, only those that changed since last time."""
        for name, shape in shapes.items():
            if state is not None and state.shapes.get(name) == shape:
                continue
            if not context.set_input_shape(name, shape):
                raise cuda.CudaError(f"TensorRT refused shape {shape} for {name} of {self.path.name}. "
                                     f"{self._logger.recent()}")
            if state is not None:
                state.shapes[name] = shape
        every = {**addresses, **{name: buf.ptr for name, buf in out_dev.items()}}
        for name, ptr in every.items():
            if state is not None and state.addresses.get(name) == ptr:
                continue
            if not context.set_tensor_address(name, ptr):
                raise cuda.CudaError(f"TensorRT refused the address of {name} of {self.path.name}. "
                                     f"{self._logger.recent()}")
            if state is not None:
                state.addresses[name] = ptr

    def _execute(self, context: trt.IExecutionContext, stream: cuda.Stream) -> None:
        if not context.execute_async_v3(stream.address):
            raise cuda.CudaError(f"TensorRT failed to run {self.path.name}. {self._logger.recent()}")

    def _run_plain(self, state: _State, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int],
                   scratch: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        context = state.context
        if self.memory_sharing and state.context_scratch != scratch[0]:
            _set_device_memory(context, *scratch)
            state.context_scratch = scratch[0]
        self._bind(context, state, shapes, addresses, state.out_dev)
        self._execute(context, state.lane.stream)
        state.plain_runs += 1
        return {spec.name: _dims(context.get_tensor_shape(spec.name)) for spec in self._outputs}

    def _run_graph(self, state: _State, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int],
                   scratch: tuple[int, int]) -> dict[str, tuple[int, ...]] | None:
        """Launch (or capture) the graph for these shapes and addresses; None: run plainly instead."""
        lane = state.lane
        if state.graph_generation != lane.generation:  # the scratch moved: every graph is stale
            state.drop_graphs()
            state.graph_generation = lane.generation
        key = tuple((name, shapes[name], addresses[name]) for name in self.input_names)
        entry = state.graphs.get(key)
        if entry is not None:
            entry.graph.launch(lane.stream)
            state.graph_launches += 1
            return entry.out_shapes
        if key in state.graph_failed:
            return None
        if len(state.graphs) >= self.settings.cuda_graph_limit:
            self._warn_once("limit", f"{self.path.name}: {len(state.graphs)} CUDA graphs in this thread, the "
                            "cuda_graph_limit; other shapes run without a graph.")
            return None
        # A context of its own: a captured graph depends on its context's state, which must not change.
        context = self._new_context()
        if self.memory_sharing:
            _set_device_memory(context, *scratch)
        self._bind(context, None, shapes, addresses, state.out_dev)
        # TensorRT finishes shape-dependent setup in the first run after a shape change, which must not
        # be captured. That run also computes this call's outputs, so the capture need not be launched.
        self._execute(context, lane.stream)
        out_shapes = {spec.name: _dims(context.get_tensor_shape(spec.name)) for spec in self._outputs}
        graph, reason = cuda.capture_graph(lane.stream, lambda: context.execute_async_v3(lane.stream.address))
        if graph is None:
            state.graph_failed.add(key)
            self._warn_once(reason, f"{self.path.name}: CUDA graph capture failed ({reason}); these shapes "
                            "run without a graph.")
        else:
            state.graphs[key] = _Graph(graph, context, out_shapes)
        return out_shapes

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def run(self, feeds: Mapping[str, Any], host: Collection[str] | None = None) -> dict[str, Any]:
        """Run the engine on `feeds`; outputs named in `host` (all when None) come back as numpy arrays,
        the others as `DeviceArray`s on this thread's stream."""
        if self._closed:
            raise UserError(f"The TensorRT runner for {self.path.name} is closed.", "Create a new Runner.")
        want_host = set(self.output_names) if host is None else set(host)
        unknown = want_host - set(self.output_names)
        if unknown:
            raise UserError(f"{self.path.name} has no output(s) {sorted(unknown)}; it has {self.output_names}.",
                            "Name only outputs the segment's manifest entry lists.")
        state = self._state()
        placed = self._feeds(feeds, state)
        shapes = self._shapes(placed)
        rows = next(feed.shape[0] for feed in placed if feed.spec.name == self._drive)
        padded_rows = shapes[self._drive][0]
        addresses = self._place(placed, shapes, state)
        state.epoch += 1  # outputs of earlier runs in this thread are about to be overwritten
        scratch = state.lane.scratch_for(self._scratch_need)
        out_shapes = self._run_graph(state, shapes, addresses, scratch) if self.cuda_graphs else None
        if out_shapes is None:
            if padded_rows != rows:  # the padded shapes were for a graph; run the exact ones
                shapes = {feed.spec.name: feed.shape for feed in placed}
                padded_rows = rows
            out_shapes = self._run_plain(state, shapes, addresses, scratch)

        stream = state.lane.stream
        result: dict[str, Any] = {}
        for spec in self._outputs:
            shape = out_shapes[spec.name]
            if padded_rows != rows:
                shape = (rows, *shape[1:])  # _probe_outputs checked that outputs follow the driving batch
            if spec.name in want_host:
                pinned = state.pinned(state.out_host, spec)
                view = pinned.view(spec.dtype, shape)
                cuda.copy_to_host(pinned.ptr, state.out_dev[spec.name].ptr, view.nbytes, stream)
                result[spec.name] = view
            else:
                result[spec.name] = DeviceArray(state.out_dev[spec.name].ptr, shape, spec.dtype, state,
                                                self.max_batch)
        if want_host:
            stream.synchronize()
            state.h2d_pending = False
            for name in want_host:
                result[name] = result[name].copy()  # the pinned buffer is reused by the next run
        return result

    # ----------------------------------------------------------------------------------- lifecycle

    def stats(self) -> dict[str, int]:
        """Counters over all threads: plain runs, graph launches, graphs held, shapes without a graph."""
        with self._lock:
            states = list(self._states)
        return {
            "plain_runs": sum(s.plain_runs for s in states),
            "graph_launches": sum(s.graph_launches for s in states),
            "graphs": sum(len(s.graphs) for s in states),
            "graph_failures": sum(len(s.graph_failed) for s in states),
        }

    def close(self) -> None:
        """Release contexts, graphs and buffers of every thread (idempotent). Call it when no thread
        is running this Runner; DeviceArrays it returned become invalid."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            states, self._states = self._states, []
        for state in states:
            state.release()
        del self._engine
        del self._runtime
        _release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
