"""Triton serving: the repository `dgate-export triton` writes, served by a real tritonserver on 127.0.0.1.

The server is the one PyPI's nvidia-pytriton bundles (Python backend only, so --platform python), from
.venv-triton (scripts/setup.sh) or $DGATE_TRITON_ENV; tests that need it skip with the reason where no
server is installed. One server per module (starting it costs seconds); requests are sent with
tritonclient by tests/triton_client.py, run in the server's environment (tritonclient's protobuf pin
conflicts with the project venv's), and compared with GatedRuntime in this process on the same rows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from serve_process import end, start_serve
from tiny_bundle import SHAPE, make_tiny_bundle

from dgate_export.cli import main
from dgate_export.errors import UserError
from dgate_export.manifest import load_manifest
from dgate_export.runtime import GatedRuntime
from dgate_export.serving import TritonServer, find_server, write_repository
from dgate_export.serving.repository import drop_index, package_modules
from dgate_export.serving.server import free_port, mean_batch_size

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).resolve().parent / "triton_client.py"
NORM = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}
NEVER = [2.0, 2.0]  # above any confidence: nobody leaves
BAD = ("400", "StatusCode.INVALID_ARGUMENT")  # INVALID_ARG over HTTP and gRPC


@dataclass
class Served:
    server: TritonServer
    runtime: GatedRuntime
    bundle: Path
    python: str
    work: Path
    name: str = "tiny"


def _install_or_skip():
    try:
        return find_server()
    except UserError as err:
        pytest.skip(f"no Triton server installed here: {err}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    install = _install_or_skip()
    root = tmp_path_factory.mktemp("serving")
    bundle, _ = make_tiny_bundle(root / "tiny", max_batch=16, normalization=NORM)
    # A short queue delay makes merging likely even on a loaded machine; 8 gate instances keep
    # 8 requests' loops in flight at once.
    info = write_repository(bundle, root / "repo", platform="python", instances=8, max_queue_delay_us=2000,
                            unbatched=True)
    # A segment that fails: the unbatched chain's last segment refuses batches of more than 2 rows (Triton
    # rejects them), and its gate model gets one instance (it only serves the failure test).
    for model, old, new in (("tiny_unbatched_seg2", "max_batch_size: 16", "max_batch_size: 2"),
                            ("tiny_unbatched", "count: 8", "count: 1")):
        config = info.path / model / "config.pbtxt"
        config.write_text(config.read_text().replace(old, new))
    # The same chain with a batching gate model (--gate-batching), as models tinyb, tinyb_seg*.
    extra = write_repository(bundle, root / "repo_b", platform="python", instances=2, max_queue_delay_us=2000,
                             gate_batching=True, name="tinyb")
    for model in extra.models:
        (extra.path / model).rename(info.path / model)
    server = TritonServer(info.path, install=install).start()
    try:
        yield Served(server, GatedRuntime.load(bundle), bundle, str(install.python or sys.executable), root)
    finally:
        server.close()


def _infer(s: Served, requests: list[dict], arrays: dict[str, np.ndarray], protocol: str = "http",
           concurrency: int = 1, tag: str = "job", model: str | None = None) -> tuple[list[dict | None], dict]:
    """Send `requests` with tritonclient; per request its outputs (or None) and the errors by index."""
    inputs, out, job_path = s.work / f"{tag}_in.npz", s.work / f"{tag}_out.npz", s.work / f"{tag}.json"
    np.savez(inputs, **arrays)
    url = s.server.http_url if protocol == "http" else s.server.grpc_url
    job = {"url": url, "protocol": protocol, "model": model or s.name, "concurrency": concurrency, "inputs": str(inputs),
           "out": str(out), "requests": requests}
    job_path.write_text(json.dumps(job))
    proc = subprocess.run([s.python, str(CLIENT), str(job_path)], capture_output=True, text=True, timeout=300, check=False,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    data = np.load(out)
    results: list[dict | None] = []
    for i in range(len(requests)):
        keys = [k for k in data.files if k.startswith(f"{i}/")]
        results.append({k.split("/", 1)[1]: data[k] for k in keys} if keys else None)
    errors = {int(k): v for k, v in report["errors"].items()}
    return results, errors


def _request(key: str, x: np.ndarray, thresholds=None, name: str = "input") -> dict:
    datatype = {"float32": "FP32", "uint8": "UINT8", "int32": "INT32", "float64": "FP64"}[str(x.dtype)]
    thr = None if thresholds is None else ",".join(repr(float(t)) for t in thresholds)
    return {"key": key, "input": name, "datatype": datatype, "thresholds": thr}


def _assert_same(got: dict | None, want, what: str) -> None:
    assert got is not None, f"{what}: no response"
    np.testing.assert_array_equal(got["exits"], want.exits, err_msg=what)
    np.testing.assert_array_equal(got["predictions"], want.predictions, err_msg=what)
    np.testing.assert_allclose(got["logits"], want.logits, rtol=0, atol=1e-4, err_msg=what)
    np.testing.assert_allclose(got["confidence"], want.confidence, rtol=0, atol=1e-5, err_msg=what)
    assert got["logits"].dtype == np.float32 and got["exits"].dtype == np.int64


def _mixed_thresholds(rt: GatedRuntime, x: np.ndarray) -> list[float]:
    """Thresholds that send about a third of x out at each exit."""
    c0 = rt.run(x, [0.0, 0.0]).confidence  # everyone leaves at gate 0: its confidences
    t0 = float(np.quantile(c0, 0.67))
    stay = x[c0 < t0]
    c1 = rt.run(stay, [2.0, 0.0]).confidence  # nobody at gate 0, everyone at gate 1
    return [t0, float(np.median(c1))]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_responses_equal_the_runtime(served, protocol):
    rt = served.runtime
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, *SHAPE)).astype(np.float32)
    big = rng.standard_normal((40, *SHAPE)).astype(np.float32)  # > max_batch 16: the runtime's chunks
    raw = rng.integers(0, 256, (9, *SHAPE), dtype=np.uint8)
    mixed = _mixed_thresholds(rt, np.concatenate([x, big]))
    cases = [("nobody leaves", "x", x, NEVER), ("all leave at gate 0", "x", x, [0.0, 0.0]),
             ("mixed", "x", x, mixed), ("bundle's thresholds", "x", x, None), ("mixed, 40 rows", "big", big, mixed),
             ("raw pixels", "raw", raw, mixed)]
    requests = [_request(key, arr, thr, "input_raw" if key == "raw" else "input") for _, key, arr, thr in cases]
    results, errors = _infer(served, requests, {"x": x, "big": big, "raw": raw}, protocol, tag=f"eq_{protocol}")
    assert errors == {}
    for (what, _, arr, thr), got in zip(cases, results):
        _assert_same(got, rt.run(arr, thr), what)
    patterns = [set(r["exits"].tolist()) for r in results[:3]]  # the requests did what their names say
    assert patterns == [{2}, {0}, {0, 1, 2}]
    assert set(results[4]["exits"].tolist()) == {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_400_and_the_server_keeps_serving(served, protocol):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, *SHAPE)).astype(np.float32)
    arrays = {"x": x, "shape": rng.standard_normal((4, 2, 8, 8)).astype(np.float32),
              "int": np.zeros((4, *SHAPE), np.int32), "u8": np.zeros((4, *SHAPE), np.uint8)}
    requests = [_request("shape", arrays["shape"]),                 # 2 channels for a 1-channel model
                _request("int", arrays["int"]),                     # INT32 where FP32 is declared
                _request("u8", arrays["u8"]),                       # raw pixels under the float input's name
                _request("x", x, [0.5]),                            # 1 threshold for 2 gates
                {**_request("x", x), "thresholds": "0.5,abc"},      # not numbers
                _request("x", x, [0.5, 0.7])]                       # fine
    results, errors = _infer(served, requests, arrays, protocol, tag=f"bad_{protocol}")
    assert sorted(errors) == [0, 1, 2, 3, 4]
    for i in range(5):
        assert errors[i][0] in BAD, errors[i]
    assert "thresholds given for a bundle with 2 gates" in errors[3][1]
    assert "comma-separated numbers" in errors[4][1]
    _assert_same(results[5], served.runtime.run(x, [0.5, 0.7]), "good request after bad ones")


@pytest.mark.slow
def test_a_segment_failure_fails_only_the_requests_it_touched(served):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, *SHAPE)).astype(np.float32)
    arrays = {"x": x, "one": x[:1]}
    requests = [_request("x", x, NEVER),         # 5 rows reach the broken segment: fails
                _request("x", x, [0.0, 0.0]),    # everyone leaves at gate 0: never touches it
                _request("one", x[:1], NEVER),   # 1 row reaches it: within its limit
                _request("x", x, NEVER)]         # fails again: the failure did not stick
    results, errors = _infer(served, requests, arrays, "http", concurrency=4, tag="fail", model="tiny_unbatched")
    assert sorted(errors) == [0, 3]
    for i in (0, 3):
        assert errors[i][0] not in BAD and "tiny_unbatched_seg2" in errors[i][1], errors[i]
    _assert_same(results[1], served.runtime.run(x, [0.0, 0.0]), "request that left at gate 0")
    _assert_same(results[2], served.runtime.run(x[:1], NEVER), "request within the segment's limit")
    good, errors = _infer(served, [_request("x", x, NEVER)], arrays, "grpc", tag="after_fail")  # the other chain
    assert errors == {}
    _assert_same(good[0], served.runtime.run(x, NEVER), "the re-batching chain after the failures")


@pytest.mark.slow
def test_concurrent_single_samples_are_rebatched_and_answered_once(served):
    """16 concurrent clients send single samples that run every segment: the last segment's executions
    must merge requests (mean executed batch > 1), and every response must be its own request's."""
    last = f"{served.name}_seg2"
    before = served.server.statistics(last)["model_stats"][0]
    rng = np.random.default_rng(3)
    n = 160
    x = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    arrays = {f"r{i}": x[i : i + 1] for i in range(n)}
    requests = [_request(f"r{i}", x[i : i + 1], NEVER) for i in range(n)]
    results, errors = _infer(served, requests, arrays, "grpc", concurrency=16, tag="rebatch")
    assert errors == {}
    want = served.runtime.run(x, NEVER)
    for i, got in enumerate(results):
        assert got is not None and got["exits"].tolist() == [2]
        np.testing.assert_allclose(got["logits"], want.logits[i : i + 1], rtol=0, atol=1e-4)
    after = served.server.statistics(last)["model_stats"][0]
    rows = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert rows == n
    assert rows / executions > 1.0, f"{rows} rows in {executions} executions: no re-batching"


@pytest.mark.slow
def test_random_sizes_and_thresholds_stress(served):
    """A small version of benchmarks/serving.py --stress: random sizes and thresholds, concurrently;
    every request answered once with its own rows' results."""
    rng = np.random.default_rng(4)
    rt = served.runtime
    requests, arrays, wants = [], {}, []
    for i in range(120):
        n = int(rng.integers(1, 21))
        x = rng.standard_normal((n, *SHAPE)).astype(np.float32)
        thr = rng.uniform(0.3, 0.5, 2).round(4).tolist()
        arrays[f"r{i}"] = x
        requests.append(_request(f"r{i}", x, thr))
        wants.append(rt.run(x, thr))
    results, errors = _infer(served, requests, arrays, "http", concurrency=16, tag="stress")
    assert errors == {}
    for i, (got, want) in enumerate(zip(results, wants)):
        _assert_same(got, want, f"request {i}")


@pytest.mark.slow
def test_example_client(served):
    """examples/triton_client.py (tritonclient only) gets the runtime's predictions, raw pixels included."""
    rng = np.random.default_rng(6)
    raw = rng.integers(0, 256, (10, *SHAPE), dtype=np.uint8)
    want = served.runtime.run(raw, [0.4, 0.4])
    np.savez(served.work / "example.npz", x=raw, y=want.predictions)
    proc = subprocess.run([served.python, str(ROOT / "examples" / "triton_client.py"), str(served.work / "example.npz"),
                           "--model", served.name, "--grpc", served.server.grpc_url, "--thresholds", "0.4,0.4",
                           "--batch", "4"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy 100.00%" in proc.stdout
    assert f"exits per gate (last: full network): {np.bincount(want.exits).tolist()}" in proc.stdout


@pytest.mark.slow
def test_batching_gate_model_merges_requests_and_answers_each(served):
    """--gate-batching: concurrent requests with the same thresholds share one run of the loop; each
    still gets its own rows' results ([N] outputs arrive as [N, 1]), and a bad one fails alone."""
    rt = served.runtime
    rng = np.random.default_rng(9)
    before = served.server.statistics("tinyb")["model_stats"][0]
    requests, arrays, wants = [], {}, []
    for i in range(96):
        n = int(rng.integers(1, 5))
        x = rng.standard_normal((n, *SHAPE)).astype(np.float32)
        thr = [[0.35, 0.36], [0.34, 0.35], NEVER][i % 3]
        arrays[f"r{i}"] = x
        requests.append(_request(f"r{i}", x, thr))
        wants.append(rt.run(x, thr))
    requests[5]["thresholds"] = "0.5"  # one threshold for two gates
    results, errors = _infer(served, requests, arrays, "grpc", concurrency=16, tag="gate_batching", model="tinyb")
    assert list(errors) == [5] and errors[5][0] in BAD
    for i, (got, want) in enumerate(zip(results, wants)):
        if i == 5:
            continue
        assert got is not None and got["exits"].shape == (len(want.exits), 1)
        _assert_same({k: v.reshape(len(want.exits), -1) if k == "logits" else v.reshape(-1) for k, v in got.items()},
                     want, f"request {i}")
    after = served.server.statistics("tinyb")["model_stats"][0]
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert executions < len(requests), "the gate model never merged requests"


def test_statistics_give_the_mean_batch():
    stats = {"model_stats": [{"inference_count": 30, "execution_count": 12}]}
    assert mean_batch_size(stats) == 2.5
    assert mean_batch_size({"model_stats": [{"inference_count": 0, "execution_count": 0}]}) == 0.0


# ------------------------------------------------------------------------------- without a server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    bundle, _ = make_tiny_bundle(tmp_path_factory.mktemp("tiny"), max_batch=16, normalization=NORM)
    return bundle


def test_gather_free_graph_computes_the_same(tiny, tmp_path):
    """Segment k>0 without `index` (what the repository ships) equals the bundle's graph gathering all rows."""
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    for k, feeds in ((1, {"prev_carry_0": rng.standard_normal((5, 4, 8, 8)).astype(np.float32)}),
                     (2, {"prev_carry_0": rng.standard_normal((3, 8, 4, 4)).astype(np.float32),
                          "prev_carry_1": rng.standard_normal((3, 4, 8, 8)).astype(np.float32)})):
        dst = tmp_path / f"s{k}.onnx"
        drop_index(tiny / f"segment{k}.onnx", dst)
        new = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        old = ort.InferenceSession(str(tiny / f"segment{k}.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in new.get_inputs()] == list(feeds)
        rows = len(next(iter(feeds.values())))
        want = old.run(None, {**feeds, "index": np.arange(rows, dtype=np.int64)})
        for a, b in zip(new.run(None, feeds), want):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="not a segment k>0 graph"):
        drop_index(tiny / "segment0.onnx", tmp_path / "s0.onnx")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


def _load_segment_model(version: Path, monkeypatch):
    """A repository's python-platform segment model.py, loaded here with a stand-in for Triton's
    triton_python_backend_utils (requests are dicts of arrays)."""
    fake = types.SimpleNamespace(get_input_tensor_by_name=lambda r, name: _FakeTensor(name, r[name]),
                                 Tensor=_FakeTensor, InferenceResponse=_FakeResponse, TritonError=str)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.setattr(sys, "path", list(sys.path))  # model.py puts its folder first
    spec = importlib.util.spec_from_file_location(f"dgate_test_model_{version.parent.name}", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel()


def test_python_segment_models_feed_index_themselves(tiny, tmp_path, monkeypatch):
    """--platform python ships the bundle's graphs as they are; each segment model k>0 feeds `index` =
    every row of the requests Triton merged, so its answers equal the bundle's graph gathering all rows."""
    import onnxruntime as ort

    repo = write_repository(tiny, tmp_path / "repo", platform="python").path
    rng = np.random.default_rng(7)
    shapes = [{"input": (1, 8, 8)}, {"prev_carry_0": (4, 8, 8)}, {"prev_carry_0": (8, 4, 4), "prev_carry_1": (4, 8, 8)}]
    for k in range(3):
        version = repo / f"tiny_seg{k}" / "1"
        assert _sha(version / "model.onnx") == _sha(tiny / f"segment{k}.onnx")  # not rewritten
        session = ort.InferenceSession(str(tiny / f"segment{k}.onnx"), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs() if i.name != "index"]
        outputs = [o.name for o in session.get_outputs()]
        config = {"input": [{"name": n} for n in names], "output": [{"name": n} for n in outputs], "parameters": {}}
        model = _load_segment_model(version, monkeypatch)
        model.initialize({"model_config": json.dumps(config)})
        assert model.index == (k > 0) and names == list(shapes[k])
        requests = [{n: rng.standard_normal((rows, *shapes[k][n])).astype(np.float32) for n in names}
                    for rows in (3, 2)]  # two requests the batcher merged
        responses = model.execute(requests)
        feeds = {n: np.concatenate([r[n] for r in requests]) for n in names}
        if k > 0:
            feeds["index"] = np.arange(5, dtype=np.int64)
        want = dict(zip(outputs, session.run(outputs, feeds)))
        assert [r.error for r in responses] == [None, None]
        for name in outputs:
            np.testing.assert_array_equal(np.concatenate([r.outputs[name] for r in responses]), want[name])
            assert [len(r.outputs[name]) for r in responses] == [3, 2]


def test_repositories_without_the_onnx_package(tiny, tmp_path, monkeypatch):
    """The plain install has no onnx: --platform python needs none; the native platforms, which rewrite
    segment k>0's graph, say which extra to install before writing anything."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    info = write_repository(tiny, tmp_path / "repo", platform="python", unbatched=True)
    assert '"index"' not in (info.path / "tiny_seg2" / "config.pbtxt").read_text()
    with pytest.raises(UserError, match=r"--platform onnxruntime needs the onnx package") as err:
        write_repository(tiny, tmp_path / "native", platform="onnxruntime")
    assert "pip install 'dgate-export[onnx]'" in err.value.hint and "--platform python" in err.value.hint
    with pytest.raises(UserError, match=r"dgate-export\[onnx\]"):
        drop_index(tiny / "segment1.onnx", tmp_path / "s1.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    res = CliRunner().invoke(main, ["triton", str(tiny), "-o", str(tmp_path / "auto")])  # auto: onnxruntime
    assert res.exit_code == 2 and "dgate-export[onnx]" in res.output and not (tmp_path / "auto").exists()


def test_repository_layout(tiny, tmp_path):
    info = write_repository(tiny, tmp_path / "repo", platform="python", instances=3, max_queue_delay_us=500,
                            unbatched=True)
    repo = info.path
    assert info.models == ["tiny", "tiny_seg0", "tiny_seg1", "tiny_seg2", "tiny_baseline", "tiny_unbatched",
                           "tiny_unbatched_seg0", "tiny_unbatched_seg1", "tiny_unbatched_seg2"]
    assert sorted(p.name for p in repo.iterdir()) == sorted([*info.models, "README.md", "dgate-repository.json"])
    seg1 = (repo / "tiny_seg1" / "config.pbtxt").read_text()
    assert "max_batch_size: 16" in seg1 and "dynamic_batching { max_queue_delay_microseconds: 500 }" in seg1
    assert '"prev_carry_0"' in seg1 and '"index"' not in seg1 and '"carry_1"' in seg1
    assert 'name: "confidence" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] }' in seg1
    assert "dynamic_batching" not in (repo / "tiny_unbatched_seg1" / "config.pbtxt").read_text()
    assert "dynamic_batching" in (repo / "tiny_baseline" / "config.pbtxt").read_text()
    gate = (repo / "tiny" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in gate and "count: 3" in gate and '"input_raw" data_type: TYPE_UINT8' in gate
    links = json.loads((repo / "tiny_unbatched" / "1" / "gate.json").read_text())
    assert [s["model"] for s in links["segments"]] == ["tiny_unbatched_seg0", "tiny_unbatched_seg1",
                                                       "tiny_unbatched_seg2"]
    assert links["segments"][2]["inputs"] == ["prev_carry_0", "prev_carry_1"]
    vendored = repo / "tiny" / "1" / "dgate_export"
    assert {"runtime.py", "manifest.py", "confidence.py", "errors.py"} <= {p.name for p in vendored.iterdir()}
    assert (repo / "tiny_seg1" / "1" / "dgate_export" / "contract.py").is_file()  # model.py imports INDEX
    assert "torch" not in " ".join(package_modules("runtime.py"))
    assert "--model-repository" in (repo / "README.md").read_text()


def test_repository_is_written_atomically(tiny, tmp_path):
    out = tmp_path / "repo"
    with pytest.raises(UserError, match="needs a TensorRT bundle"):
        write_repository(tiny, out, platform="tensorrt", kind="gpu")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    write_repository(tiny, out, platform="python")
    with pytest.raises(UserError, match="already exists"):
        write_repository(tiny, out, platform="python")
    write_repository(tiny, out, platform="onnxruntime", force=True)
    assert 'platform: "onnxruntime_onnx"' in (out / "tiny_seg0" / "config.pbtxt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temp or old folder left


def test_cli_triton_and_serve_without_a_server(tiny, tmp_path, monkeypatch):
    runner = CliRunner()
    res = runner.invoke(main, ["triton", str(tiny), "-o", str(tmp_path / "r"), "--platform", "python"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "tiny_seg2" / "1" / "model.onnx").is_file()
    monkeypatch.setenv("DGATE_TRITON_ENV", str(tmp_path / "nowhere"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    res = runner.invoke(main, ["serve", str(tiny)])
    assert res.exit_code == 2
    assert "No Triton Inference Server is installed here" in res.output and "setup.sh" in res.output
    res = runner.invoke(main, ["serve", str(tiny), "--repo", str(tmp_path / "r")])  # exists: refused first
    assert res.exit_code == 2 and "already exists" in res.output


@pytest.mark.slow
def test_serve_command_answers_and_stops_on_ctrl_c(tiny, tmp_path):
    _install_or_skip()
    serve = start_serve(tiny, tmp_path, "--instances", "1")
    try:
        ready = serve.wait_line("ready:", timeout=180)
        line = next(text for t, text in serve.lines if t == ready)
        assert f"HTTP http://127.0.0.1:{serve.http}" in line and "gRPC 127.0.0.1:" in line and "/metrics" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{serve.http}/v2/models/tiny/ready", timeout=5) as r:
            assert r.status == 200
        serve.proc.send_signal(signal.SIGINT)
        serve.proc.wait(60)
    finally:
        left = end(serve)
    assert serve.proc.returncode == 0, serve.text()
    assert "stopped: drained" in serve.text() and left == []
    assert not (tmp_path / f"dgate-serve-{serve.proc.pid}.log").exists()  # a clean run keeps no log
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{serve.http}/v2/health/live", timeout=2)


def _metric_values(text: str, name: str, **labels) -> dict[str, float]:
    """{the label that varies: value} of `name`'s samples whose labels include `labels`."""
    from dgate_export.drift import parse_metrics

    out = {}
    for got, value in parse_metrics(text, name):
        if all(got.get(k) == v for k, v in labels.items()):
            rest = {k: v for k, v in got.items() if k not in labels}
            out[",".join(f"{k}={v}" for k, v in sorted(rest.items()))] = value
    return out


@pytest.mark.slow
def test_gate_model_metrics_count_exits_and_confidences(served):
    """The gate model's own counters on Triton's metrics endpoint, summed over its 8 instances: samples and
    requests per exit and the confidence histogram per gate, apart for the bundle's thresholds and a
    request's own; serve's health probe is answered but not counted."""
    from dgate_export.manifest import load_manifest
    from dgate_export.serving.serve import Probe

    rt, server = served.runtime, served.server
    before = server.metrics()
    probe = Probe(load_manifest(served.bundle), served.name)
    assert probe(server.http_url, 30) is None  # the probe goes through every segment: a right answer
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((int(rng.integers(1, 6)), *SHAPE)).astype(np.float32) for _ in range(30)]
    mixed = _mixed_thresholds(rt, np.concatenate(xs))
    arrays = {f"r{i}": x for i, x in enumerate(xs)}
    requests = [_request(f"r{i}", x, None if i % 3 else mixed) for i, x in enumerate(xs)]
    _, errors = _infer(served, requests, arrays, "grpc", concurrency=6, tag="metrics")
    assert errors == {}
    want = {"bundle": np.zeros(3, int), "request": np.zeros(3, int)}
    want_requests = {"bundle": np.zeros(3, int), "request": np.zeros(3, int)}
    conf = {"bundle": [[], []], "request": [[], []]}
    for i, x in enumerate(xs):
        label, thr = ("bundle", None) if i % 3 else ("request", mixed)
        res = rt.run(x, thr)
        counts = np.bincount(res.exits, minlength=3)
        want[label] += counts
        want_requests[label] += counts > 0
        every = rt.run(x, [0.0, 0.0]).confidence  # gate 0 sees every sample
        conf[label][0] += every.tolist()
        stay = x[res.exits > 0]
        if len(stay):
            conf[label][1] += rt.run(stay, [2.0, 0.0]).confidence.tolist()  # gate 1 sees those gate 0 kept
    deadline = time.monotonic() + 20
    while True:  # the instances add their counts every 0.25 s
        after = server.metrics()
        got = {lab: [_metric_values(after, "dgate_exit_samples_total", model="tiny", thresholds=lab, exit=str(e))
                     .get("", 0.0) - _metric_values(before, "dgate_exit_samples_total", model="tiny", thresholds=lab,
                                                    exit=str(e)).get("", 0.0) for e in range(3)]
               for lab in ("bundle", "request")}
        if all(got[lab] == want[lab].tolist() for lab in got) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == {lab: want[lab].tolist() for lab in want}
    time.sleep(1.0)  # nothing more arrives (the probe, sent first, is not counted)
    assert server.metrics().count("dgate_exit_samples_total") == after.count("dgate_exit_samples_total")
    assert _metric_values(server.metrics(), "dgate_exit_samples_total", model="tiny") == _metric_values(
        after, "dgate_exit_samples_total", model="tiny")

    def delta(name, **labels):
        return {k: v - _metric_values(before, name, **labels).get(k, 0.0)
                for k, v in _metric_values(after, name, **labels).items()}

    for lab in ("bundle", "request"):
        reqs = delta("dgate_exit_requests_total", model="tiny", thresholds=lab)
        assert [reqs[f"exit={e}"] for e in range(3)] == want_requests[lab].tolist()
        for gate in (0, 1):
            seen = np.asarray(conf[lab][gate], dtype=np.float32)
            buckets = delta("dgate_gate_confidence_bucket", model="tiny", thresholds=lab, gate=str(gate))
            assert buckets["le=+Inf"] == len(seen)
            assert buckets["le=0.5"] == int((seen <= 0.5).sum()) and buckets["le=0.9"] == int((seen <= 0.9).sum())
            count = delta("dgate_gate_confidence_count", model="tiny", thresholds=lab, gate=str(gate))
            assert count[""] == len(seen)
            total = delta("dgate_gate_confidence_sum", model="tiny", thresholds=lab, gate=str(gate))
            assert total[""] == pytest.approx(float(seen.sum()), rel=1e-4)
    in_flight = _metric_values(after, "dgate_requests_in_flight", model="tiny")
    assert len(in_flight) == 8 and set(in_flight.values()) == {0.0}  # one per instance, all idle now


@pytest.mark.slow
def test_serve_metrics_endpoint_and_the_drift_alarm(tiny, tmp_path):
    """serve's metrics endpoint gives Triton's metrics and serve's own; with a reference the served mix does
    not follow, a window of 150 samples raises the drift alarm (a log line, the metrics, `drift --metrics`)."""
    import shutil

    from dgate_export.drift import reference_record
    from dgate_export.manifest import write_manifest

    _install_or_skip()
    bundle = tmp_path / "b"
    shutil.copytree(tiny, bundle)
    m = load_manifest(bundle)
    m.exit_reference = reference_record([0.98, 0.01, 0.01], 5000, m.thresholds, on="a test", by="the test")
    write_manifest(bundle, m)
    serve = start_serve(bundle, tmp_path, "--drift-window", "150")
    metrics_port = serve.metrics
    try:
        serve.wait_line("ready:", timeout=180)
        serve.wait_line("drift: every 150 samples", timeout=10)
        rng = np.random.default_rng(12)
        x = rng.standard_normal((400, *SHAPE)).astype(np.float32)
        client = Served(SimpleNamespace(http_url=f"127.0.0.1:{serve.http}"), None, bundle,  # type: ignore[arg-type]
                        str(find_server().python), tmp_path)
        arrays = {f"r{i}": x[i * 8:(i + 1) * 8] for i in range(50)}
        _, errors = _infer(client, [_request(k, v) for k, v in arrays.items()], arrays, "http", concurrency=4,
                           tag="drift")
        assert errors == {}
        alarm = serve.wait_line("drift: window 1: DRIFT", timeout=60)
        assert alarm
        # The gate model's counters reach the endpoint every 0.25 s (a background flush), the last requests'
        # a moment after their answers: wait until all 400 samples are counted.
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
                text = r.read().decode()
            counted = sum(_metric_values(text, "dgate_exit_samples_total", model="tiny", thresholds="bundle").values())
            if counted >= 400 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert counted == 400
        assert "nv_inference_count" in text and "dgate_exit_samples_total" in text  # Triton's and the model's
        assert 'dgate_drift_alarm{model="tiny"} 1' in text and "dgate_serve_ready 1" in text
        assert 'dgate_drift_windows_total{model="tiny"} ' in text and "dgate_serve_restarts_total 0" in text
        res = CliRunner().invoke(main, ["drift", str(bundle), "--metrics", f"127.0.0.1:{metrics_port}"])
        assert res.exit_code == 1 and "DRIFT" in res.output and "400 samples" in res.output, res.output
        serve.proc.send_signal(signal.SIGINT)
        serve.proc.wait(60)
    finally:
        left = end(serve)
    assert serve.proc.returncode == 0 and left == []


def test_serve_on_a_taken_port_says_so_before_writing_anything(tiny, tmp_path):
    _install_or_skip()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = CliRunner().invoke(main, ["serve", str(tiny), "--port", str(port), "--grpc-port", str(free_port()),
                                        "--metrics-port", str(free_port()), "--repo", str(tmp_path / "repo")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"Port {port} on 127.0.0.1 (--port) is in use" in text and "failed to load" not in text, res.output
    same = CliRunner().invoke(main, ["serve", str(tiny), "--port", "8123", "--grpc-port", "8123"])
    assert same.exit_code == 2 and "must differ" in same.output
    assert list(tmp_path.iterdir()) == []
