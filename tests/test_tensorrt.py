"""The TensorRT backend.

Two kinds of tests:
- Tests that run everywhere: the package imports without TensorRT, available() says how to install it,
  options and the compatibility rule are checked, and mypy checks every TensorRT call of the backend
  against TensorRT's API stubs (the one real check of this backend on a machine without a GPU).
- Tests marked `tensorrt` build real engines and compare them with ONNX Runtime on the same graphs;
  they skip, saying why, where TensorRT or a GPU is missing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dgate_export.backends import get_backend, list_backends
from dgate_export.backends import tensorrt as backend
from dgate_export.backends.tensorrt.common import (
    BuildSettings,
    build_settings,
    check_compatible,
    parse_cuda_array,
    run_settings,
)
from dgate_export.errors import UserError

TRT_OK, TRT_WHY = backend.available()
no_trt = pytest.mark.skipif(TRT_OK, reason="TensorRT is usable here; this checks the machines without it")

# ------------------------------------------------------------------------------ runs everywhere


def test_package_imports_without_heavy_libraries():
    code = ("import sys, dgate_export, dgate_export.backends.tensorrt as t; t.available(); "
            "print(sorted(m for m in ('torch', 'dgate_export.backends.tensorrt.runner', "
            "'dgate_export.backends.tensorrt.builder') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert "tensorrt" in list_backends()


@no_trt
def test_available_says_how_to_install():
    ok, hint = backend.available()
    assert ok is False
    assert "pip install 'dgate-export[tensorrt]'" in hint
    assert "NVIDIA GPU" in hint and "TensorRT 10 or 11" in hint and "cuda-python" in hint


@no_trt
def test_get_backend_and_build_refuse_with_the_hint(tmp_path):
    with pytest.raises(UserError) as err:
        get_backend("tensorrt")
    assert "pip install 'dgate-export[tensorrt]'" in str(err.value)
    with pytest.raises(UserError, match="cannot be used on this machine"):
        backend.build(tmp_path / "segment0.onnx", tmp_path, {"max_batch": 4})
    with pytest.raises(UserError, match="cannot be used on this machine"):
        backend.Runner(tmp_path / "segment0.engine", {})


def test_build_settings_defaults_and_mistakes():
    s = build_settings({"precision": "fp16", "max_batch": 32})
    assert s == BuildSettings("fp16", 32, 32, None, None, False, False)
    assert build_settings({"max_batch": 32, "opt_batch": 8, "workspace_mb": 512}).opt_batch == 8
    with pytest.raises(UserError, match="--opt-batch"):
        build_settings({"max_batch": 8, "opt_batch": 9})
    with pytest.raises(UserError, match="--max-batch"):
        build_settings({"max_batch": True})
    with pytest.raises(UserError, match="--workspace-mb"):
        build_settings({"max_batch": 8, "workspace_mb": 0})
    assert build_settings({"max_batch": 8, "precision": "int8"}).precision == "int8"
    with pytest.raises(UserError, match="precision"):
        build_settings({"max_batch": 8, "precision": "int4"})
    with pytest.raises(UserError, match="opt_btach"):
        build_settings({"max_batch": 8, "opt_btach": 4})


def test_run_settings_refuse_unknown_options():
    s = run_settings({"precision": "fp32", "max_batch": 4, "cuda_graphs": True})
    assert s.cuda_graphs and s.share_memory and s.backend_info is None
    with pytest.raises(UserError, match="cuda_graph\\b"):
        run_settings({"cuda_graph": True})


INFO = {"tensorrt_version": "10.13.0.35", "hardware_compatibility": "NONE",
        "gpu": {"name": "NVIDIA A10", "compute_capability": "8.6"}}


def _here(version="10.13.0.35", name="NVIDIA A10", cc="8.6"):
    return {"tensorrt_version": version, "gpu": {"name": name, "compute_capability": cc}}


def test_compatibility_rule():
    check_compatible(INFO, _here(), "The bundle")  # the machine that built it
    with pytest.raises(UserError, match=r"TensorRT 10\.13\.0\.35.*TensorRT 10\.14\.1") as err:
        check_compatible(INFO, _here(version="10.14.1"), "The bundle")
    assert "--backend tensorrt --force" in str(err.value)
    with pytest.raises(UserError, match="--hardware-compatible"):
        check_compatible(INFO, _here(name="NVIDIA H100", cc="9.0"), "The bundle")
    ampere_plus = {**INFO, "hardware_compatibility": "AMPERE_PLUS"}
    check_compatible(ampere_plus, _here(name="NVIDIA H100", cc="9.0"), "The bundle")
    with pytest.raises(UserError, match="Ampere or newer"):
        check_compatible(ampere_plus, _here(name="Tesla T4", cc="7.5"), "The bundle")
    with pytest.raises(UserError, match="lacks"):
        check_compatible({"tensorrt_version": "10.13.0.35"}, _here(), "The bundle")


class _Cai:
    """A device array as torch or CuPy describe one: only the interface dictionary."""

    def __init__(self, **cai):
        self.__cuda_array_interface__ = {"version": 3, "data": (0x7F0000, False), **cai}


def test_cuda_array_interface_is_read_and_checked():
    a = parse_cuda_array(_Cai(shape=(4, 3), typestr="<f4", strides=None, stream=7), "x")
    assert (a.ptr, a.shape, a.dtype, a.stream) == (0x7F0000, (4, 3), np.dtype(np.float32), 7)
    assert parse_cuda_array(_Cai(shape=(4, 3), typestr="<f2", strides=(6, 2)), "x").stream is None
    with pytest.raises(UserError, match="not C-contiguous"):
        parse_cuda_array(_Cai(shape=(4, 3), typestr="<f4", strides=(4, 16)), "x")


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-python is not installed")
def test_cuda_errors_name_the_call():
    from dgate_export.backends.tensorrt import cuda

    count, why = cuda.device_count()
    if count:
        pytest.skip("a CUDA device is present; this checks the error path of machines without one")
    assert why  # e.g. "cudaErrorInsufficientDriver: CUDA driver version is insufficient ..."
    with pytest.raises(cuda.CudaError, match=r"cudaMalloc\(16\) failed with cudaError"):
        cuda.DeviceBuffer(16)


def _cuda_devices() -> int:
    if importlib.util.find_spec("cuda") is None:
        return 0
    from dgate_export.backends.tensorrt import cuda

    return cuda.device_count()[0]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_devices(), reason="needs cuda-python and a CUDA GPU")
def test_cuda_wrappers_move_memory_and_replay_graphs():
    """The CUDA layer under the TensorRT runner, on a real GPU: pinned -> device -> pinned copies on a
    stream, memset, events, and a captured graph that replays its copies with the pinned buffer's new
    contents (what --cuda-graphs relies on)."""
    from dgate_export.backends.tensorrt import cuda

    info = cuda.device_info()
    assert info["name"] and info["cuda_runtime"] > 0 and "." in info["compute_capability"]
    n = 1 << 16
    src, dst = cuda.PinnedBuffer(4 * n), cuda.PinnedBuffer(4 * n)
    dev = cuda.DeviceBuffer(4 * n)
    stream, done = cuda.Stream(), cuda.Event()
    try:
        a, b = src.view(np.dtype(np.float32), (n,)), dst.view(np.dtype(np.float32), (n,))
        a[:] = np.arange(n, dtype=np.float32)
        cuda.copy_to_device(dev.ptr, src.ptr, 4 * n, stream)
        cuda.copy_to_host(dst.ptr, dev.ptr, 4 * n, stream)
        done.record(stream)
        done.synchronize()
        np.testing.assert_array_equal(b, a)
        cuda.fill_zero(dev.ptr, 4 * n, stream)
        cuda.copy_to_host(dst.ptr, dev.ptr, 4 * n, stream)
        stream.synchronize()
        assert not b.any()

        def enqueue() -> bool:
            cuda.copy_to_device(dev.ptr, src.ptr, 4 * n, stream)
            cuda.copy_to_host(dst.ptr, dev.ptr, 4 * n, stream)
            return True

        graph, why = cuda.capture_graph(stream, enqueue)
        assert graph is not None, why
        a[:] = -a  # a graph copies whatever the pinned buffer holds when it is launched
        graph.launch(stream)
        stream.synchronize()
        np.testing.assert_array_equal(b, -np.arange(n, dtype=np.float32))
        graph.destroy()
        failed, why = cuda.capture_graph(stream, lambda: False)  # a failed capture leaves the stream usable
        assert failed is None and "returned False" in why
        cuda.copy_to_host(dst.ptr, dev.ptr, 4 * n, stream)
        stream.synchronize()
    finally:
        for obj in (src, dst, dev):
            obj.free()
        stream.destroy()
        done.destroy()


@pytest.mark.slow
def test_mypy_checks_the_backend_against_tensorrt_stubs():
    """The real check of this backend where TensorRT cannot run: every TensorRT call exists with that
    signature in TensorRT 10.13's API (tensorrt-stubs), and a probe proves the stubs are in effect."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install 'dgate-export[dev]')")
    from importlib import metadata

    try:
        metadata.version("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install 'dgate-export[dev]')")
    script = Path(__file__).resolve().parent.parent / "scripts" / "typecheck_tensorrt.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "Success: no issues found" in report


# ------------------------------------------------------------------ needs TensorRT and a GPU

SEGMENTS = ("segment0", "segment1", "segment2", "baseline")
MAX_BATCH = 16


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def trt_tiny(request, tmp_path_factory):
    """The tiny hand-made bundle's graphs, built into TensorRT engines beside them."""
    if not TRT_OK:
        pytest.skip(f"TensorRT backend unavailable: {TRT_WHY}")
    from tiny_bundle import make_tiny_bundle

    precision = request.param
    out, _ = make_tiny_bundle(tmp_path_factory.mktemp(f"trt-{precision}"), precision=precision,
                              max_batch=MAX_BATCH)
    options = {"precision": precision, "max_batch": MAX_BATCH, "opt_batch": 8}
    entries = {name: backend.build(out / f"{name}.onnx", out, options) for name in SEGMENTS}
    info = backend.finish_build(out, options)
    return out, precision, entries, info


def _ort(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _input(n: int, precision: str, seed: int = 0) -> np.ndarray:
    dtype = np.float16 if precision == "fp16" else np.float32
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(dtype)


def _close(got, want, precision: str) -> None:
    tol = 2e-2 if precision == "fp16" else 1e-4
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def _reference_chain(out: Path, x: np.ndarray, keep1: np.ndarray, keep2: np.ndarray) -> list[dict]:
    s = [_ort(out / f"segment{k}.onnx") for k in range(3)]
    o0 = dict(zip(["carry_0", "logits", "confidence"], s[0].run(None, {"input": x})))
    o1 = dict(zip(["carry_0", "carry_1", "logits", "confidence"],
                  s[1].run(None, {"prev_carry_0": o0["carry_0"], "index": keep1})))
    o2 = dict(zip(["logits"], s[2].run(None, {"prev_carry_0": o1["carry_0"], "prev_carry_1": o1["carry_1"],
                                              "index": keep2})))
    return [o0, o1, o2]


def _trt_chain(runners, x, keep1, keep2, host=("logits", "confidence")) -> list[dict]:
    o0 = runners[0].run({"input": x}, host=set(host))
    o1 = runners[1].run({"prev_carry_0": o0["carry_0"], "index": keep1}, host=set(host))
    o2 = runners[2].run({"prev_carry_0": o1["carry_0"], "prev_carry_1": o1["carry_1"], "index": keep2})
    return [o0, o1, o2]


def _runners(out: Path, info: dict, **options) -> list:
    return [backend.Runner(out / f"segment{k}.engine", {"backend_info": info, **options}) for k in range(3)]


@pytest.mark.tensorrt
def test_build_writes_engines_info_and_one_timing_cache(trt_tiny):
    import hashlib

    import tensorrt as trt

    out, _, entries, info = trt_tiny
    for name, entry in entries.items():
        data = (out / entry["file"]).read_bytes()
        assert entry["file"] == f"{name}.engine" and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert (entry["max_batch"], entry["opt_batch"]) == (MAX_BATCH, 8)
    assert (out / "timing.cache").stat().st_size > 0 and info["timing_cache"] == "timing.cache"
    assert info["tensorrt_version"] == trt.__version__ and info["hardware_compatibility"] == "NONE"
    assert info["gpu"]["name"] and "." in info["gpu"]["compute_capability"]


@pytest.mark.tensorrt
@pytest.mark.parametrize("n", [1, 5, MAX_BATCH])
def test_segments_match_onnxruntime_host_and_device_feeds(trt_tiny, n):
    out, precision, _, info = trt_tiny
    x = _input(n, precision, seed=n)
    keep1 = np.arange(n, dtype=np.int64)[::2]
    keep2 = np.arange(len(keep1), dtype=np.int64)[::-1]
    want = _reference_chain(out, x, keep1, keep2)
    runners = _runners(out, info)
    try:
        got = _trt_chain(runners, x, keep1, keep2)  # carries stay on the GPU between segments
        for k in range(3):
            for name, ref in want[k].items():
                value = got[k][name]
                _close(value if isinstance(value, np.ndarray) else value.numpy(), ref, precision)
        assert not isinstance(got[0]["carry_0"], np.ndarray) and got[0]["carry_0"].shape == want[0]["carry_0"].shape
        # Host feeds for carries give the same result as device ones.
        again = runners[1].run({"prev_carry_0": want[0]["carry_0"], "index": keep1})
        _close(again["logits"], want[1]["logits"], precision)
    finally:
        for r in runners:
            r.close()


@pytest.mark.tensorrt
def test_feed_mistakes_are_user_errors(trt_tiny):
    out, precision, _, info = trt_tiny
    runner = backend.Runner(out / "segment0.engine", {"backend_info": info})
    try:
        with pytest.raises(UserError, match="rows"):
            runner.run({"input": _input(MAX_BATCH + 1, precision)})
        with pytest.raises(UserError, match="shape"):
            runner.run({"input": np.zeros((2, 1, 7, 8), _input(1, precision).dtype)})
        wrong = np.float32 if precision == "fp16" else np.float16
        with pytest.raises(UserError, match="takes"):
            runner.run({"input": np.zeros((2, 1, 8, 8), wrong)})
        with pytest.raises(UserError, match="no output"):
            runner.run({"input": _input(2, precision)}, host={"features"})
    finally:
        runner.close()


@pytest.mark.tensorrt
def test_refuses_a_bundle_from_another_tensorrt_or_gpu(trt_tiny):
    out, _, _, info = trt_tiny
    with pytest.raises(UserError, match="9.9.9"):
        backend.Runner(out / "segment0.engine", {"backend_info": {**info, "tensorrt_version": "9.9.9"}})
    other = {**info, "gpu": {"name": "Some Other GPU", "compute_capability": "5.0"}}
    with pytest.raises(UserError, match="--hardware-compatible"):
        backend.Runner(out / "segment0.engine", {"backend_info": other})


@pytest.mark.tensorrt
def test_cuda_graphs_give_the_plain_results(trt_tiny):
    out, precision, _, info = trt_tiny
    plain, graphs = _runners(out, info), _runners(out, info, cuda_graphs=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for n in (3, 7, 4, 3, 16, 1, 7):  # repeats reuse the bucket's graph
                x = _input(n, precision, seed=n)
                keep1 = np.arange(n, dtype=np.int64)[n // 3:]
                keep2 = np.arange(len(keep1), dtype=np.int64)[::2]
                a, b = _trt_chain(plain, x, keep1, keep2), _trt_chain(graphs, x, keep1, keep2)
                for k in range(3):
                    for name in ("logits",):
                        np.testing.assert_allclose(b[k][name], a[k][name], rtol=1e-5, atol=1e-5)
        for runner in graphs:  # graphs really ran: a failed capture (plain execution took over) fails here
            stats = runner.stats()
            assert stats["graph_launches"] > 0 and stats["graph_failures"] == 0, (stats, [str(w.message) for w in caught])
    finally:
        for r in plain + graphs:
            r.close()


@pytest.mark.tensorrt
def test_threads_get_their_own_contexts_and_buffers(trt_tiny):
    out, precision, _, info = trt_tiny
    runners = _runners(out, info)
    inputs = [_input(9, precision, seed=s) for s in range(4)]
    keep1, keep2 = np.arange(9, dtype=np.int64)[1:], np.arange(8, dtype=np.int64)[::3]
    want = [_trt_chain(runners, x, keep1, keep2)[2]["logits"] for x in inputs]

    def work(i: int) -> None:
        for _ in range(20):
            got = _trt_chain(runners, inputs[i], keep1, keep2)[2]["logits"]
            np.testing.assert_allclose(got, want[i], rtol=1e-5, atol=1e-5)

    try:
        with ThreadPoolExecutor(4) as pool:
            for future in [pool.submit(work, i) for i in range(4)]:
                future.result()  # re-raises a thread's failure here
    finally:
        for r in runners:
            r.close()


@pytest.mark.tensorrt
def test_torch_cuda_tensors_are_bound_without_copy(trt_tiny):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    out, precision, _, info = trt_tiny
    x = _input(6, precision)
    runner = backend.Runner(out / "segment0.engine", {"backend_info": info})
    try:
        want = runner.run({"input": x})
        got = runner.run({"input": torch.from_numpy(x).cuda()})
        np.testing.assert_array_equal(got["logits"], want["logits"])
    finally:
        runner.close()


@pytest.mark.tensorrt
@pytest.mark.slow
def test_build_bundle_runs_like_onnxruntime(tmp_path):
    """The whole pipeline: a gated checkpoint built for TensorRT gives ONNX Runtime's exits."""
    if not TRT_OK:
        pytest.skip(f"TensorRT backend unavailable: {TRT_WHY}")
    from dgate_export.compile import checkpoint
    from dgate_export.compile.build import BuildOptions, build_bundle
    from dgate_export.compile.model import GatedModel
    from dgate_export.compile.zoo import arch_info, build_backbone
    from dgate_export.runtime import GatedRuntime

    kwargs = {"num_classes": 10}
    model = GatedModel(build_backbone("resnet20", kwargs), list(arch_info("resnet20").default_exits),
                       arch={"name": "resnet20", "kwargs": kwargs}, num_classes=10, input_shape=(1, 28, 28))
    path = checkpoint.save(model, tmp_path / "model.pt")
    bundle = build_bundle(path, tmp_path / "bundle", BuildOptions(backend="tensorrt", max_batch=8), progress=None)
    from dgate_export.compile.parity import probe_thresholds

    x = np.random.default_rng(0).standard_normal((40, 1, 28, 28)).astype(np.float32)
    trt_rt = GatedRuntime.load(bundle)
    ort_rt = GatedRuntime.load(bundle, backend="onnxruntime")
    try:
        # Thresholds mid-gap between these rows' confidences (ONNX Runtime's) at every gate: samples
        # leave at each gate and the rest go on compacted, on TensorRT as on ONNX Runtime.
        gates = ort_rt.num_gates
        confs = [ort_rt.run(x, thresholds=[2.0] * k + [0.0] + [2.0] * (gates - k - 1)).confidence
                 for k in range(gates)]
        thresholds = probe_thresholds(confs)
        a, b = trt_rt.run(x, thresholds=thresholds), ort_rt.run(x, thresholds=thresholds)
        assert all(c > 0 for c in b.exit_counts[:gates]) and b.exit_counts[1:].sum() > 0, b.exit_counts
        np.testing.assert_array_equal(a.exits, b.exits)
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-3, atol=1e-3)
        ones = [trt_rt.run(x[i:i + 1], thresholds=thresholds) for i in range(8)]  # the batch-1 path
        np.testing.assert_array_equal(np.concatenate([o.exits for o in ones]), b.exits[:8])
    finally:
        trt_rt.close()
        ort_rt.close()


def test_int8_graphs_for_tensorrt_are_symmetric_int8(tmp_path):
    """What TensorRT's explicit quantization takes (zero points 0, signed int8), checked where it cannot run:
    the quantizer's output for --backend tensorrt; ONNX Runtime's graphs get uint8 activations instead."""
    import onnx
    from onnx import numpy_helper
    from tiny_bundle import make_tiny_bundle

    from dgate_export.compile.quantize import quantize_graph

    out, _ = make_tiny_bundle(tmp_path / "b", max_batch=MAX_BATCH)
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    for target, dtype, symmetric in (("tensorrt", np.int8, True), ("onnxruntime", np.uint8, False)):
        path = tmp_path / f"{target}.onnx"
        path.write_bytes((out / "segment0.onnx").read_bytes())
        quantize_graph(path, {"input": x}, backend=target, first_graph=False)
        graph = onnx.load(str(path)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        zero_points = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
        assert zero_points and all(z.dtype == dtype for z in zero_points), target
        assert all((z == 0).all() for z in zero_points) == symmetric, target


@pytest.mark.tensorrt
@pytest.mark.slow
def test_int8_bundle_builds_and_runs_like_onnxruntime(tmp_path):
    """build --precision int8 --backend tensorrt: QDQ graphs in strongly typed networks; the engines give
    ONNX Runtime's predictions on the same QDQ graphs for nearly every row; a float graph is refused."""
    if not TRT_OK:
        pytest.skip(f"TensorRT backend unavailable: {TRT_WHY}")
    from export_models import gated, save

    from dgate_export.calibrate import Target
    from dgate_export.compile.build import BuildOptions, build_bundle
    from dgate_export.compile.quantize import CalibrationData
    from dgate_export.data import load_dataset
    from dgate_export.manifest import load_manifest
    from dgate_export.runtime import GatedRuntime

    train = load_dataset("fashion-mnist", "train")
    np.savez(tmp_path / "fm.npz", x=train.x[:1200], y=train.y[:1200])
    data = f"npz:{tmp_path / 'fm.npz'}"
    model = gated("resnet20", kwargs={"width": 8}, input_shape=(1, 28, 28), num_classes=10,
                  data_split={"data": data, "val_size": 300, "seed": 0}, thresholds=[0.6, 0.6, 0.6])
    path = save(model, tmp_path / "m.pt")
    calibration = CalibrationData(data=data, rows=256, target=Target(guarantee="none"))
    bundle = build_bundle(path, tmp_path / "bundle", BuildOptions(backend="tensorrt", precision="int8", max_batch=64,
                                                                  calibration=calibration), progress=None)
    manifest = load_manifest(bundle)
    assert manifest.precision == "int8" and all(s.engine["precision"] == "int8" for s in manifest.segments)
    x = train.x[2000:2200]
    a = GatedRuntime.load(bundle).run(x)
    b = GatedRuntime.load(bundle, backend="onnxruntime").run(x)
    assert (a.predictions == b.predictions).mean() >= 0.9 and (a.exits == b.exits).mean() >= 0.9
    with pytest.raises(UserError, match="no QuantizeLinear"):
        from tiny_bundle import make_tiny_bundle

        floats, _ = make_tiny_bundle(tmp_path / "f", max_batch=8)
        backend.build(floats / "segment0.onnx", floats, {"precision": "int8", "max_batch": 8})


@pytest.mark.tensorrt
@pytest.mark.slow
def test_build_checks_the_engines_against_torch_through_the_runtime(tmp_path, monkeypatch):
    """Step 8 (verify) loads the built bundle with GatedRuntime on TensorRT and compares it with torch: it
    records the engines' parity, and an engine whose logits are off fails the build there."""
    if not TRT_OK:
        pytest.skip(f"TensorRT backend unavailable: {TRT_WHY}")
    from export_models import gated, save

    from dgate_export.compile.build import BuildOptions, build_bundle
    from dgate_export.manifest import load_manifest

    path = save(gated(thresholds=[0.6, 0.5]), tmp_path / "skip.pt")
    lines: list[str] = []
    out = build_bundle(path, tmp_path / "ok", BuildOptions(backend="tensorrt", max_batch=16), progress=lines.append)
    assert any(line.startswith("[8/9] verify") and "tensorrt" in line for line in lines), lines
    assert any("TensorRT, every row out at each of the 3 exits" in line for line in lines), lines
    assert load_manifest(out).source["parity_tensorrt"]["probe_rows"] == 16

    from dgate_export.backends.tensorrt.runner import Runner as TensorRTRunner

    right = TensorRTRunner.run

    def off(self, feeds, host=None):  # an engine whose logits are 0.5 off (the runtime reads them on the host)
        outputs = right(self, feeds, host)
        return {**outputs, "logits": np.asarray(outputs["logits"]) + 0.5}

    monkeypatch.setattr(TensorRTRunner, "run", off)
    with pytest.raises(UserError, match=r"step 8/9 \(verify\).*TensorRT: exit 0's logits differ"):
        build_bundle(path, tmp_path / "bad", BuildOptions(backend="tensorrt", max_batch=16), progress=None)
    assert not (tmp_path / "bad").exists()
