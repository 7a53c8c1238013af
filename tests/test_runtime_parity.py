"""The core check: bundles made by `build_bundle`, run by GatedRuntime, against GatedModel.early_exit.

For every model of the build tests (a zoo ResNet, a skip-connection model, torchvision ResNet-18 and
DenseNet-121 gated at 3 points), on real Fashion-MNIST images, at batch sizes 1, 7 and 64, with
thresholds that make no sample, some samples and every sample leave at each gate: the exits must be
identical and the logits and confidences equal within float32 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from export_models import gated

from dgate_export.compile import checkpoint
from dgate_export.compile.build import BuildOptions, build_bundle
from dgate_export.compile.heads import confidence_torch
from dgate_export.data import load_dataset
from dgate_export.runtime import GatedRuntime

MODELS = {
    # name: (arch, input shape, arch kwargs, gated-model kwargs), slow ones marked below
    "resnet20": ("resnet20", (1, 28, 28), {}, {}),
    "resnet20-grid": ("resnet20", (1, 28, 28), {}, {"head": "grid", "head_kwargs": {"hidden": 16}}),
    "skipnet": ("test_skipnet", (1, 28, 28), {}, {}),
    "torchvision-resnet18": ("torchvision/resnet18", (3, 28, 28), {}, {}),
    "torchvision-densenet121": ("torchvision/densenet121", (3, 32, 32), {}, {}),
}
SLOW = {"torchvision-resnet18", "torchvision-densenet121"}
NUM_CLASSES = 10


def _images(shape: tuple[int, int, int], n: int = 64) -> np.ndarray:
    data = load_dataset("fashion-mnist", "test", channels=shape[0]).subset(n, seed=3)
    x = data.x
    pad = (shape[1] - x.shape[2]) // 2
    if pad:  # DenseNet-121 needs 32x32: pad with the normalized value of a black pixel
        black = -data.normalization["mean"][0] / data.normalization["std"][0]
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=black)
    return np.ascontiguousarray(x, dtype=np.float32)


def _mid_gap(conf: np.ndarray, q: float) -> float:
    """A threshold near quantile q, in the middle of the widest nearby gap: no sample sits near it, so
    float differences between ONNX Runtime and torch cannot flip a decision."""
    s = np.sort(conf)
    i = int(np.clip(round(q * (len(s) - 1)), 1, len(s) - 2))
    lo, hi = max(i - len(s) // 8, 0), min(i + len(s) // 8, len(s) - 1)
    j = lo + int(np.argmax(np.diff(s[lo:hi + 1])))
    return float((s[j] + s[j + 1]) / 2)


@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [])
                                        for name in MODELS])
def case(request, tmp_path_factory):
    arch, shape, kwargs, extra = MODELS[request.param]
    torch.manual_seed(0)
    model = gated(arch, input_shape=shape, num_classes=NUM_CLASSES, kwargs=kwargs, **extra)
    x = _images(shape)
    with torch.no_grad():
        # Random heads on wide features saturate softmax (confidence 1.0 for everyone); scale each
        # linear head so its logits have std 2 on this data, giving confidences spread over (0, 1).
        for head, logits in zip(model.heads, model(torch.from_numpy(x))[:-1]):
            for p in head.parameters():
                p.mul_(2.0 / float(logits.std()))
        exits = model(torch.from_numpy(x))  # every gate's logits for every sample
    confs = [confidence_torch(model.confidence, logits).numpy() for logits in exits[:-1]]
    some, reach = [], np.ones(len(x), bool)
    for conf in confs:  # about half of the samples reaching each gate leave there
        some.append(_mid_gap(conf[reach], 0.5))
        reach &= conf < some[-1]
    tmp = tmp_path_factory.mktemp(request.param.replace("/", "-"))
    bundle = build_bundle(checkpoint.save(model, tmp / "model.pt"), tmp / "bundle",
                          BuildOptions(max_batch=64), progress=None)
    return model, GatedRuntime.load(bundle), x, some


def _plans(k_gates: int, some: list[float]) -> dict[str, list[float]]:
    plans = {"none-exit": [1.5] * k_gates, "some-exit": some}
    for k in range(k_gates):  # everyone reaching gate k leaves there
        plans[f"all-exit-at-{k}"] = [1.5] * k + [0.0] + [1.5] * (k_gates - k - 1)
    return plans


def _check_against_torch(model, rt, x, some, n, tol):
    """Yield (plan name, runtime result, torch reference) after checking exits and logits within tol."""
    batch = x[:n] if n != 7 else x[20:27]
    for name, thresholds in _plans(model.num_gates, some).items():
        ref = model.early_exit(torch.from_numpy(batch), thresholds)
        res = rt.run(batch, thresholds=thresholds)
        np.testing.assert_array_equal(res.exits, ref.exits.numpy(), err_msg=name)
        scale = max(1.0, float(ref.logits.abs().max()))
        np.testing.assert_allclose(res.logits, ref.logits.numpy(), rtol=tol, atol=tol * scale, err_msg=name)
        yield name, res, ref


@pytest.mark.parametrize("n", [1, 7, 64])
def test_runtime_matches_torch_reference(case, n):
    model, rt, x, some = case
    for name, res, ref in _check_against_torch(model, rt, x, some, n, tol=1e-4):
        np.testing.assert_allclose(res.confidence, ref.confidence.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(res.exit_counts, np.bincount(ref.exits.numpy(), minlength=model.num_gates + 1))
        if name == "none-exit":
            assert res.exit_counts[-1] == n
        elif name.startswith("all-exit-at-"):
            assert res.exit_counts[int(name.rsplit("-", 1)[1])] == n


_FIXED: dict = {}


@pytest.mark.parametrize("n", [1, 7])  # 7: padded to 8, survivors compacted to 4, 2, 1 or kept at 8
def test_fixed_buffers_match_torch_reference(case, n):
    """The fixed-address path (what CUDA graphs need), on ONNX Runtime's CPU provider: compacting at
    every gate and carrying exited rows as padding both give the reference's exits and logits (larger
    batches and chunks through this path: tests/test_runtime.py)."""
    model, rt, x, some = case
    root = rt.manifest.root
    fixed = _FIXED[root] = _FIXED.get(root) or GatedRuntime.load(root, fixed_buffers=True)  # one per bundle
    assert fixed._fixed
    batch = x[:n] if n != 7 else x[20:27]
    pad = [{b: 1.0 for b in fixed.buckets()}] * (model.num_gates + 1)  # no bucket faster: never compact
    for name, thresholds in _plans(model.num_gates, some).items():
        ref = model.early_exit(torch.from_numpy(batch), thresholds)
        scale = max(1.0, float(ref.logits.abs().max()))
        for times in (None, pad):
            fixed.bucket_times = times
            res = fixed.run(batch, thresholds=thresholds)
            what = f"{name}, {'pad' if times else 'compact'}"
            np.testing.assert_array_equal(res.exits, ref.exits.numpy(), err_msg=what)
            np.testing.assert_allclose(res.logits, ref.logits.numpy(), rtol=1e-4, atol=1e-4 * scale, err_msg=what)
            np.testing.assert_allclose(res.confidence, ref.confidence.numpy(), rtol=1e-4, atol=1e-5, err_msg=what)


def test_some_thresholds_use_every_exit(case):
    _, rt, x, some = case
    counts = rt.run(x, thresholds=some).exit_counts
    assert (counts > 0).all(), f"{counts}: the 'some' plan must send samples out at every exit"


def test_bundle_path_is_real(case):
    _, rt, _, _ = case
    root = Path(rt.manifest.root)
    assert (root / "manifest.json").is_file() and rt.manifest.backend == "onnxruntime"


def _cuda_ep() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ep(), reason="needs onnxruntime-gpu and a CUDA GPU")
@pytest.mark.parametrize("n", [1, 7, 64])
def test_cuda_runtime_matches_torch_reference(case, n):
    """The same bundle on ONNX Runtime's CUDA provider (TF32 off, so float32 tolerances hold), carries
    kept on the GPU between segments: the same exits, and logits equal to the torch reference."""
    model, rt, x, some = case
    gpu = GatedRuntime.load(rt.manifest.root, providers=["cuda"], provider_options={"cuda": {"use_tf32": "0"}})
    try:
        assert gpu.baseline_runner().providers[0] == "CUDAExecutionProvider"
        for _ in _check_against_torch(model, gpu, x, some, n, tol=1e-3):
            pass
    finally:
        gpu.close()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ep(), reason="needs onnxruntime-gpu and a CUDA GPU")
@pytest.mark.parametrize("n", [1, 7, 64])
def test_cuda_graphs_runtime_matches_torch_reference(case, n):
    """Fixed buffers with CUDA graphs on the CUDA provider (each slot captured, then replayed), after a
    warmup that captures every slot: the same exits and logits as the torch reference, compacting at
    every gate and with the measured compact-or-pad table."""
    model, rt, x, some = case
    root = rt.manifest.root
    gpu = _GRAPHS.get(root)
    if gpu is None:  # one per bundle: its sessions, slots and graphs serve every n
        gpu = _GRAPHS[root] = GatedRuntime.load(root, providers=["cuda"], cuda_graphs=True,
                                                provider_options={"cuda": {"use_tf32": "0"}})
        gpu.warmup()
        _GRAPHS[root, "table"] = gpu.profile_buckets(repeats=2)
    for times in (None, _GRAPHS[root, "table"]):
        gpu.bucket_times = times
        for _ in range(2):  # the second pass replays what the first captured
            for _ in _check_against_torch(model, gpu, x, some, n, tol=1e-3):
                pass


_GRAPHS: dict = {}
