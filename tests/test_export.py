"""export.py: each segment graph follows the ONNX contract and computes what the torch segment computes,
for both exporters and both precisions; unexportable segments give a UserError naming the segment."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_models import gated

from dgate_export.compile.export import export_baseline, export_segment, segment_graph
from dgate_export.errors import UserError

FEEDS = [(5, [4, 0, 0, 2]), (1, [0]), (2, [1, 0, 1, 1, 0, 0, 1])]  # (rows, index): duplicates, N > P too


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_segment(model, k, graph, dtype, tol):
    session = _session(graph.path)
    x = torch.randn(6, *model.input_shape).to(dtype)
    with torch.no_grad():
        carries = (x,)
        for segment in model.segments[:k]:
            carries = segment(*carries)
    cases = [(None, None)] if k == 0 else FEEDS
    for rows, index in cases:
        if k == 0:
            args = (x,)
            feeds = {"input": x.numpy()}
        else:
            idx = torch.tensor(index, dtype=torch.int64)
            args = (*(c[:rows] for c in carries), idx)
            feeds = {f"prev_carry_{i}": c[:rows].numpy() for i, c in enumerate(carries)} | {"index": idx.numpy()}
        with torch.no_grad():
            ref = segment_graph(model, k)(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = session.run(None, feeds)
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert g.shape == tuple(r.shape)
            np.testing.assert_allclose(g.astype(np.float32), r.float().numpy(), atol=tol, rtol=tol)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_segments_follow_the_contract(tmp_path, exporter):
    model = gated()  # skipnet: two tensors cross each cut
    graphs = [export_segment(model, k, tmp_path / f"s{k}.onnx", max_batch=16, exporter=exporter) for k in range(3)]

    s0, s1, s2 = graphs
    assert s0.inputs == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert [t["name"] for t in s0.outputs] == ["carry_0", "carry_1", "logits", "confidence"]
    assert s0.outputs[0]["shape"] == ["batch", 4, 8, 8]  # block1's output: the gate's features first
    assert s0.outputs[2:] == [{"name": "logits", "shape": ["batch", 4], "dtype": "float32"},
                              {"name": "confidence", "shape": ["batch"], "dtype": "float32"}]
    assert s1.inputs == [{"name": "prev_carry_0", "shape": ["rows", 4, 8, 8], "dtype": "float32"},
                         {"name": "prev_carry_1", "shape": ["rows", 4, 8, 8], "dtype": "float32"},
                         {"name": "index", "shape": ["batch"], "dtype": "int64"}]
    # block2's output, and the stem's output still crosses the second cut (the add comes after block2)
    assert [t["name"] for t in s1.outputs] == ["carry_0", "carry_1", "logits", "confidence"]
    assert [t["name"] for t in s2.inputs] == ["prev_carry_0", "prev_carry_1", "index"]
    assert s2.outputs == [{"name": "logits", "shape": ["batch", 4], "dtype": "float32"}]

    for k, graph in enumerate(graphs):
        onnx.checker.check_model(str(graph.path), full_check=True)
        _check_segment(model, k, graph, torch.float32, 1e-5)
        if k > 0:
            # The gather is the first thing done to every carry: its only consumers are Gather(axis 0).
            proto = onnx.load(str(graph.path))
            for name in [t["name"] for t in graph.inputs if t["name"].startswith("prev_carry_")]:
                users = [n for n in proto.graph.node if name in n.input]
                assert users and all(n.op_type == "Gather" and n.input[0] == name for n in users), users
                for n in users:
                    assert all(a.i == 0 for a in n.attribute if a.name == "axis")
                    # A carry feeding a residual Add goes through the 1x1 identity convolution (the layout
                    # hint that lets ONNX Runtime keep the segment in its blocked layout); the others not.
                    # (The torchscript exporter adds a Shape beside it.)
                    after = [m for m in proto.graph.node if n.output[0] in m.input]
                    hinted = int(name.rsplit("_", 1)[1]) in segment_graph(model, k).hints
                    assert any(_is_identity_conv(m, proto) for m in after) == hinted, [m.op_type for m in after]
    # skipnet: block2 (segment 1) is a plain chain; its output and the stem's both feed the Add that
    # begins segment 2
    assert [segment_graph(model, k).hints for k in (1, 2)] == [set(), {0, 1}]


def _is_identity_conv(node, proto) -> bool:
    """A 1x1 Conv whose weight (an initializer or a Constant) is the identity matrix."""
    if node.op_type != "Conv":
        return False
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for c in proto.graph.node:
        value = [a.t for a in c.attribute if a.name == "value"] if c.op_type == "Constant" else []
        if value:
            weights[c.output[0]] = onnx.numpy_helper.to_array(value[0])
    w = weights.get(node.input[1])
    return w is not None and w.ndim == 4 and w.shape[2:] == (1, 1) and np.array_equal(
        w[:, :, 0, 0], np.eye(w.shape[0], dtype=w.dtype))


def test_fp16_segments(tmp_path):
    model = gated().half()
    for k in range(3):
        graph = export_segment(model, k, tmp_path / f"s{k}.onnx", max_batch=16)
        for t in graph.inputs + graph.outputs:
            want = {"index": "int64", "confidence": "float32"}.get(t["name"], "float16")
            assert t["dtype"] == want, t
        _check_segment(model, k, graph, torch.float16, 2e-2)


def test_baseline(tmp_path):
    model = gated()
    graph = export_baseline(model, tmp_path / "b.onnx", max_batch=16)
    assert graph.inputs == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert graph.outputs == [{"name": "logits", "shape": ["batch", 4], "dtype": "float32"}]
    x = torch.randn(7, 1, 8, 8)
    got = _session(graph.path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model.backbone(x).numpy(), atol=1e-5, rtol=1e-5)


def test_mid_network_export_failure_names_the_segment(tmp_path):
    model = gated("test_svdnet")
    export_segment(model, 1, tmp_path / "s1.onnx", max_batch=16)  # the part before the bad op exports
    with pytest.raises(UserError) as info:
        export_segment(model, 2, tmp_path / "s2.onnx", max_batch=16)
    message = str(info.value)
    assert "segment 2 (after exit 'block2')" in message
    assert "--exporter torchscript" in message


def test_max_batch_one_still_gives_dynamic_dims(tmp_path):
    model = gated()
    graph = export_segment(model, 1, tmp_path / "s1.onnx", max_batch=1)
    assert [t["shape"][0] for t in graph.inputs] == ["rows", "rows", "batch"]
    assert all(t["shape"][0] == "batch" for t in graph.outputs)
    _check_segment(model, 1, graph, torch.float32, 1e-5)
