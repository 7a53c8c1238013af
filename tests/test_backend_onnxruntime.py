"""The ONNX Runtime backend: build() names the graph, Runner runs it with the options it was given."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_bundle import make_tiny_bundle

from dgate_export.backends import get_backend
from dgate_export.backends import onnxruntime as backend
from dgate_export.errors import UserError
from dgate_export.manifest import sha256_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


def _carry(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)


@torch.no_grad()
def _torch_seg1(ref, carry: np.ndarray, index: np.ndarray) -> list[np.ndarray]:
    return [t.numpy() for t in ref.s1(torch.from_numpy(carry), torch.from_numpy(index))]


def test_registry_and_available():
    assert get_backend("onnxruntime") is backend
    assert backend.available() == (True, "")


def test_build_names_the_graph_and_checks_it_loads(tiny, tmp_path):
    bundle, _ = tiny
    out = tmp_path / "b"
    out.mkdir()
    (out / "segment1.onnx").write_bytes((bundle / "segment1.onnx").read_bytes())
    entry = backend.build(out / "segment1.onnx", out, {"precision": "fp32", "max_batch": 16})
    assert entry == {"file": "segment1.onnx", "sha256": sha256_file(out / "segment1.onnx")}
    assert backend.finish_build(out, {}) == {"onnxruntime": ort.__version__}

    (out / "broken.onnx").write_bytes(b"not a graph")
    with pytest.raises(UserError, match="cannot load broken.onnx"):
        backend.build(out / "broken.onnx", out, {})


def test_runner_matches_torch_and_gathers(tiny):
    bundle, ref = tiny
    runner = backend.Runner(bundle / "segment1.onnx", {})
    assert runner.input_names == ["prev_carry_0", "index"]
    assert runner.output_names == ["carry_0", "carry_1", "logits", "confidence"]
    assert runner.providers == ["CPUExecutionProvider"]
    carry, index = _carry(6), np.array([5, 0, 3], dtype=np.int64)
    out = runner.run({"prev_carry_0": carry, "index": index}, host={"logits", "confidence"})
    assert list(out) == runner.output_names
    for name, want in zip(runner.output_names, _torch_seg1(ref, carry, index)):
        assert isinstance(out[name], np.ndarray)  # CPU: carries are host memory anyway
        np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["carry_1"], carry[index])  # the gathered skip, rows in index order

    # A value returned by one run (or an OrtValue) is a valid feed.
    again = runner.run({"prev_carry_0": ort.OrtValue.ortvalue_from_numpy(carry), "index": index})
    np.testing.assert_array_equal(again["logits"], out["logits"])


@pytest.mark.parametrize("options", [
    {"intra_op_num_threads": 2, "allow_spinning": True},
    {"graph_optimization_level": "disable", "execution_mode": "parallel", "inter_op_num_threads": 2},
    {"providers": ["cpu"], "precision": "fp32", "max_batch": 16},
])
def test_runner_options_give_the_same_outputs(tiny, options):
    bundle, _ = tiny
    carry, index = _carry(5, 1), np.array([4, 1], dtype=np.int64)
    want = backend.Runner(bundle / "segment1.onnx", {}).run({"prev_carry_0": carry, "index": index})
    got = backend.Runner(bundle / "segment1.onnx", options).run({"prev_carry_0": carry, "index": index})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, match", [
    ({"threads": 2}, "Unknown onnxruntime option"),
    ({"execution_mode": "fast"}, "execution_mode"),
    ({"graph_optimization_level": "max"}, "graph_optimization_level"),
    ({"providers": ["NoSuchExecutionProvider"]}, "not available"),
])
def test_runner_refuses_bad_options(tiny, options, match):
    bundle, _ = tiny
    with pytest.raises(UserError, match=match):
        backend.Runner(bundle / "segment0.onnx", options)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA EP is installed")
def test_cuda_without_onnxruntime_gpu_says_how_to_install(tiny):
    bundle, _ = tiny
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        backend.Runner(bundle / "segment0.onnx", {"providers": ["cuda"]})


def test_missing_engine_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        backend.Runner(tmp_path / "nothing.onnx", {})


def test_runner_is_thread_safe(tiny):
    bundle, _ = tiny
    runner = backend.Runner(bundle / "segment1.onnx", {"intra_op_num_threads": 1})
    jobs = [(_carry(3 + i % 5, i), np.arange(i % 3, 3 + i % 5, dtype=np.int64)) for i in range(16)]
    want = [runner.run({"prev_carry_0": c, "index": ix})["logits"] for c, ix in jobs]
    got: dict[int, list[np.ndarray]] = {}

    def work(t: int) -> None:
        got[t] = [runner.run({"prev_carry_0": jobs[(t + j) % 16][0], "index": jobs[(t + j) % 16][1]})["logits"]
                  for j in range(40)]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(8):
        for j, logits in enumerate(got[t]):
            np.testing.assert_array_equal(logits, want[(t + j) % 16])


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_keeps_carries_on_the_device(tiny):
    bundle, _ = tiny
    cpu = backend.Runner(bundle / "segment0.onnx", {})
    gpu0 = backend.Runner(bundle / "segment0.onnx", {"providers": ["cuda"]})
    gpu1 = backend.Runner(bundle / "segment1.onnx", {"providers": ["cuda"]})
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    out = gpu0.run({"input": x}, host={"logits", "confidence"})
    assert isinstance(out["carry_0"], ort.OrtValue) and out["carry_0"].device_name().lower() == "cuda"
    assert isinstance(out["logits"], np.ndarray)
    want = cpu.run({"input": x})
    np.testing.assert_allclose(out["logits"], want["logits"], rtol=1e-3, atol=1e-4)
    nxt = gpu1.run({"prev_carry_0": out["carry_0"], "index": np.array([2, 0], dtype=np.int64)})
    np.testing.assert_allclose(nxt["carry_1"], want["carry_0"][[2, 0]], rtol=1e-3, atol=1e-4)


def test_slots_bind_fixed_buffers_once(tiny):
    """fixed_buffers: a slot per (rows, upstream rows) with buffers made once; carries are read from the
    upstream slot's output buffers in place, results equal a plain run, reads on the CPU are no copies."""
    bundle, _ = tiny
    seg0 = backend.Runner(bundle / "segment0.onnx", {"fixed_buffers": True})
    seg1 = backend.Runner(bundle / "segment1.onnx", {"fixed_buffers": True, "batch_input": "index"})
    plain0, plain1 = backend.Runner(bundle / "segment0.onnx", {}), backend.Runner(bundle / "segment1.onnx", {})
    assert seg0.fixed_buffers and seg0.batch_buckets and not plain0.batch_buckets
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    s0 = seg0.slot(8)
    assert seg0.slot(8) is s0
    s1 = seg1.slot(4, s0, [("prev_carry_0", "carry_0")])
    assert seg1.slot(4, s0, [("prev_carry_0", "carry_0")]) is s1 and seg1.slot(8, s0, []) is not s1
    addresses = {name: v.data_ptr() for name, v in {**s0.values, **s1.values}.items()}
    s1.write("index", np.full(4, 6, np.int64))  # a full slot first: the 3-row writes must pad row 3 with 0
    for seed in range(2):
        x = np.random.default_rng(seed).standard_normal((8, 1, 8, 8)).astype(np.float32)
        index = np.array([7, 2, 5], dtype=np.int64)  # 3 rows in a slot of 4: padded with row 0
        s0.write("input", x)
        s0.run()
        s1.write("index", index)
        s1.run()
        want0 = plain0.run({"input": x})
        want1 = plain1.run({"prev_carry_0": want0["carry_0"], "index": np.array([7, 2, 5, 0], np.int64)})
        for slot, want in ((s0, want0), (s1, want1)):
            for name, value in want.items():
                np.testing.assert_array_equal(slot.read(name), value, err_msg=name)
        assert s1.read("logits") is s1.read("logits")  # the buffer itself on the CPU
        assert {name: v.data_ptr() for name, v in {**s0.values, **s1.values}.items()} == addresses
    assert (s0.runs, s1.runs) == (2, 2)

    # A plain run() of host arrays at a bucket size goes through a slot too (the un-gated baseline), and
    # its outputs are copies that the next run does not change.
    first = seg0.run({"input": x}, host={"logits"})
    assert seg0.slot(8).runs == 3 and isinstance(first["carry_0"], ort.OrtValue)
    kept = first["logits"].copy()
    seg0.run({"input": x[::-1].copy()})
    np.testing.assert_array_equal(first["logits"], kept)
    odd = seg0.run({"input": x[:3]})  # 3 rows: no slot, a plain run
    np.testing.assert_array_equal(odd["logits"], want0["logits"][:3])


def test_the_runtime_tells_each_runner_its_batch_input(tiny):
    """The backend knows no tensor names: GatedRuntime passes `batch_input` (the contract's `index` in
    segments k>0, `input` in segment 0 and the baseline); without it a runner takes its first input."""
    from dgate_export.runtime import GatedRuntime

    bundle, _ = tiny
    assert backend.Runner(bundle / "segment1.onnx", {}).batch_input == "prev_carry_0"
    with pytest.raises(UserError, match="batch_input 'nope' is not an input of segment1.onnx"):
        backend.Runner(bundle / "segment1.onnx", {"batch_input": "nope"})
    rt = GatedRuntime.load(bundle)
    assert [r.batch_input for r in rt._runners] == ["input"] + ["index"] * (len(rt._runners) - 1)
    assert rt.baseline_runner().batch_input == "input"


def test_cuda_graphs_need_the_cuda_provider(tiny):
    bundle, _ = tiny
    with pytest.raises(UserError, match="cuda_graphs needs ONNX Runtime's CUDA provider"):
        backend.Runner(bundle / "segment0.onnx", {"cuda_graphs": True})
    options = backend._with_cuda_graph({"providers": ["cuda"], "provider_options": {"cuda": {"device_id": 1}}})
    assert options["provider_options"] == {"cuda": {"device_id": 1, "enable_cuda_graph": "1"}}


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_graph_slots_replay_with_new_inputs(tiny):
    """A slot with a CUDA graph: captured on its third run, then replayed; new inputs written in place
    give new outputs (the graph reads the bound buffers), equal to the CPU's."""
    bundle, _ = tiny
    cpu = backend.Runner(bundle / "segment0.onnx", {})
    gpu = backend.Runner(bundle / "segment0.onnx", {"providers": ["cuda"], "cuda_graphs": True,
                                                     "provider_options": {"cuda": {"use_tf32": "0"}}})
    slot = gpu.slot(4)
    for seed in range(5):
        x = np.random.default_rng(seed).standard_normal((4, 1, 8, 8)).astype(np.float32)
        slot.write("input", x)
        slot.run()
        np.testing.assert_allclose(slot.read("logits"), cpu.run({"input": x})["logits"], rtol=1e-3, atol=1e-4)
    plain = gpu.run({"input": x[:3]}, host={"logits"})  # outside the slots: no graph (gpu_graph_id -1)
    np.testing.assert_allclose(plain["logits"], cpu.run({"input": x[:3]})["logits"], rtol=1e-3, atol=1e-4)
