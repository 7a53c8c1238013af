"""Small wrappers over cuda-python's runtime API (`cuda.bindings.runtime`) for the TensorRT backend.

cuda-python returns `(error, *results)` tuples; `check` turns a failure into a `CudaError` naming the
CUDA error. Device memory, pinned host memory, streams, events and graphs are plain objects that free
their memory in `free()` (never in `__del__`: CUDA may already be torn down at interpreter exit).
Imported only by the TensorRT backend, after `available()` said cuda-python is here.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np
from cuda.bindings import runtime as cudart

try:  # cuda-bindings 12.9.1+: int(handle) is deprecated there in favour of this
    from cuda.bindings.utils import get_cuda_native_handle as _native
except ImportError:  # older 12.x
    _native = int


def address(handle: Any) -> int:
    """The raw value of a CUDA handle (stream, graph, ...) as a Python int."""
    return int(_native(handle))


class CudaError(RuntimeError):
    """A CUDA runtime call failed (a driver, device or programming problem, not a user mistake)."""


def error_text(err: Any) -> str:
    name = cudart.cudaGetErrorName(err)[1]
    text = cudart.cudaGetErrorString(err)[1]
    name = name.decode() if isinstance(name, bytes) else str(name)
    text = text.decode() if isinstance(text, bytes) else str(text)
    return f"{name}: {text}"


def check(result: tuple[Any, ...], what: str = "CUDA call") -> Any:
    """Unwrap a cuda-python result: raise on error, return the value (or the tuple of values)."""
    err = result[0]
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaError(f"{what} failed with {error_text(err)}")
    rest = result[1:]
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def device_count() -> tuple[int, str]:
    """(number of CUDA devices, "" or the reason there are none usable)."""
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        return 0, error_text(err)
    return int(count), "" if count else "no CUDA device found"


def device_info() -> dict[str, Any]:
    """The current device: index, name and compute capability ("8.6"), and CUDA versions."""
    index = int(check(cudart.cudaGetDevice(), "cudaGetDevice"))
    prop = check(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    return {
        "index": index,
        "name": name,
        "compute_capability": f"{prop.major}.{prop.minor}",
        "cuda_runtime": int(check(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")),
        "cuda_driver": int(check(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")),
    }


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc: 256-byte aligned, as TensorRT wants)."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})")) if nbytes else 0

    def free(self) -> None:
        if self.ptr:
            check(cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class PinnedBuffer:
    """`nbytes` of page-locked host memory, seen from numpy; copies from it to the device are async."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart.cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})"))
        raw = (ctypes.c_ubyte * self.nbytes).from_address(self.ptr)
        self._bytes = np.frombuffer(memoryview(raw), dtype=np.uint8)

    def view(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if count > self.nbytes:
            raise ValueError(f"a {shape} {dtype} view needs {count} bytes; the buffer has {self.nbytes}")
        return self._bytes[:count].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self._bytes = np.empty(0, dtype=np.uint8)
            check(cudart.cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class Stream:
    """A non-blocking CUDA stream (graph capture needs a stream other than the legacy default)."""

    def __init__(self) -> None:
        self.handle = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                            "cudaStreamCreateWithFlags")
        self.address = address(self.handle)

    def synchronize(self) -> None:
        check(cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def wait_for(self, event: Event) -> None:
        check(cudart.cudaStreamWaitEvent(self.handle, event.handle, 0), "cudaStreamWaitEvent")

    def destroy(self) -> None:
        if self.address:
            check(cudart.cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.address = 0


class Event:
    def __init__(self) -> None:
        self.handle = check(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming),
                            "cudaEventCreateWithFlags")

    def record(self, stream: Any) -> None:
        """Record on `stream`: a Stream, or a raw handle (int) such as a CUDA array's producer stream."""
        handle = stream.handle if isinstance(stream, Stream) else stream
        check(cudart.cudaEventRecord(self.handle, handle), "cudaEventRecord")

    def synchronize(self) -> None:
        check(cudart.cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart.cudaEventDestroy(self.handle), "cudaEventDestroy")
            self.handle = None


def copy_to_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    if nbytes:
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                     stream.handle), "cudaMemcpyAsync (host to device)")


def copy_to_host(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    if nbytes:
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                     stream.handle), "cudaMemcpyAsync (device to host)")


def fill_zero(dst: int, nbytes: int, stream: Stream) -> None:
    if nbytes:
        check(cudart.cudaMemsetAsync(dst, 0, nbytes, stream.handle), "cudaMemsetAsync")


class Graph:
    """An instantiated CUDA graph, launched on a stream."""

    def __init__(self, exec_handle: Any):
        self.exec_handle = exec_handle

    def launch(self, stream: Stream) -> None:
        check(cudart.cudaGraphLaunch(self.exec_handle, stream.handle), "cudaGraphLaunch")

    def destroy(self) -> None:
        if self.exec_handle is not None:
            check(cudart.cudaGraphExecDestroy(self.exec_handle), "cudaGraphExecDestroy")
            self.exec_handle = None


def capture_graph(stream: Stream, enqueue: Callable[[], bool]) -> tuple[Graph | None, str]:
    """Capture what `enqueue()` puts on `stream` into a graph: (graph, "") or (None, why it failed).

    Thread-local capture mode: other threads keep using CUDA freely while this one captures. Whatever
    fails, the stream leaves capture mode and the non-sticky error is cleared, so plain execution can go
    on in the same stream.
    """
    err = cudart.cudaStreamBeginCapture(
        stream.handle, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)[0]
    if err != cudart.cudaError_t.cudaSuccess:
        return None, f"cudaStreamBeginCapture: {error_text(err)}"
    ok = False
    graph = None
    try:
        ok = enqueue()
    finally:
        err, graph = cudart.cudaStreamEndCapture(stream.handle)
        try:
            if ok and err != cudart.cudaError_t.cudaSuccess:
                reason = f"cudaStreamEndCapture: {error_text(err)}"
            elif ok:
                err, exec_handle = cudart.cudaGraphInstantiate(graph, 0)
                reason = "" if err == cudart.cudaError_t.cudaSuccess else f"cudaGraphInstantiate: {error_text(err)}"
            else:
                reason = "TensorRT's execute_async_v3 returned False during capture"
        finally:
            if graph is not None and address(graph):
                cudart.cudaGraphDestroy(graph)  # the instantiated graph does not need its template
            cudart.cudaGetLastError()  # clear a non-sticky capture error before plain execution goes on
    if reason:
        return None, reason
    return Graph(exec_handle), ""
