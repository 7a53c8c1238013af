"""train.py on tiny models and small subsets of real Fashion-MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_arch import EXITS, NAME

from dgate_export.compile.model import GatedModel
from dgate_export.compile.train import cache_gate_features, collect_exit_logits, train_backbone, train_gates
from dgate_export.compile.zoo import build_backbone
from dgate_export.data import DEFAULT_FMNIST_DIR, Dataset, load_dataset
from dgate_export.errors import UserError

pytestmark = pytest.mark.skipif(
    not (DEFAULT_FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
ARCH = {"name": NAME, "kwargs": {}}


@pytest.fixture(scope="module")
def data():
    train = load_dataset("fashion-mnist", "train", val_size=500).subset(3000, seed=0)
    val = load_dataset("fashion-mnist", "val", val_size=500).subset(300, seed=0)
    return train, val


def accuracy(model, ds):
    with torch.no_grad():
        return float((model(torch.from_numpy(ds.x)).argmax(1).numpy() == ds.y).mean())


@pytest.fixture(scope="module")
def backbone(data):
    torch.manual_seed(0)
    model = build_backbone(ARCH["name"], ARCH["kwargs"])
    return train_backbone(model, data[0], epochs=2, batch_size=64, progress=False)


def gated_of(backbone, head="linear"):
    return GatedModel.attach(backbone, list(EXITS), arch=ARCH, num_classes=10,
                             input_shape=(1, 28, 28), head=head)


def test_train_backbone_learns(data, backbone):
    val = data[1]
    assert not backbone.training
    untrained = build_backbone(ARCH["name"], ARCH["kwargs"])
    # Chance is 0.1; two short epochs of the tiny CNN on 3000 images reach about 0.7.
    assert accuracy(backbone, val) > max(0.5, accuracy(untrained, val) + 0.3)


def exit_accuracies(gated, ds):
    logits, y = collect_exit_logits(gated, ds, batch_size=100, progress=False)
    return [float((lg.argmax(1) == y).mean()) for lg in logits]


@pytest.mark.parametrize("loss, head", [("ce", "linear"), ("hinge", "mlp"), ("ce", "grid")])
def test_train_gates_keeps_backbone_frozen(data, backbone, loss, head):
    train, val = data
    gated = gated_of(backbone, head)
    before = {k: v.clone() for k, v in gated.backbone.state_dict().items()}  # BN running stats too
    untrained = exit_accuracies(gated, val)
    accs = train_gates(gated, train, epochs=5, loss=loss, batch_size=128, progress=False)
    assert len(accs) == 3 and all(a > 0.18 for a in accs)  # chance: 0.1 (the stem has 8 channels)
    after = gated.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The gates learned something that holds on held-out rows; the backbone's exit is unchanged.
    trained = exit_accuracies(gated, val)
    assert all(t > u + 0.05 for t, u in zip(trained[:3], untrained[:3])), (untrained, trained)
    assert trained[3] == untrained[3]
    assert max(trained[:3]) > 0.5


def test_collect_exit_logits_matches_the_model(data, backbone):
    gated = gated_of(backbone)
    val = data[1].subset(70)
    logits, y = collect_exit_logits(gated, val, batch_size=32, progress=False)  # uneven last batch
    assert len(logits) == 4 and all(lg.shape == (70, 10) for lg in logits)
    np.testing.assert_array_equal(y, val.y)
    with torch.no_grad():
        x = torch.from_numpy(val.x)
        np.testing.assert_allclose(logits[-1], backbone(x).numpy(), atol=1e-5)
        np.testing.assert_allclose(logits[1], gated(x)[1].numpy(), atol=1e-5)


def test_cached_features_match_gate_features(data, backbone):
    gated = gated_of(backbone)
    val = data[1].subset(50)
    pooled = cache_gate_features(gated, val, batch_size=16, progress=False)
    with torch.no_grad():
        ref, _ = gated.gate_features(torch.from_numpy(val.x))
    assert [p.shape for p in pooled] == [r.shape for r in ref]
    assert all(torch.allclose(p, r, atol=1e-5) for p, r in zip(pooled, ref))


def test_bad_arguments_are_user_errors(data, backbone):
    gated = gated_of(backbone)
    with pytest.raises(UserError, match="hinge"):
        train_gates(gated, data[0], loss="l2", progress=False)
    with pytest.raises(UserError, match="epochs"):
        train_backbone(backbone, data[0], epochs=0, progress=False)


@pytest.mark.parametrize("rows", [2, 3, 129, 192])
def test_backbone_trains_on_small_data(rows):
    """Few steps broke the one-cycle schedule (ZeroDivisionError); a last batch of one row broke
    BatchNorm at a 1x1 feature map. Every size from 2 rows trains, to finite weights."""
    x = np.random.default_rng(0).standard_normal((rows, 1, 28, 28)).astype(np.float32)
    ds = Dataset(x, np.arange(rows, dtype=np.int64) % 10, None, None)
    torch.manual_seed(0)
    model = _tiny_with_1x1_batchnorm()
    train_backbone(model, ds, epochs=2, batch_size=128 if rows > 3 else 2, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _tiny_with_1x1_batchnorm():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 10))


def test_backbone_training_needs_two_rows():
    ds = Dataset(np.zeros((1, 1, 28, 28), np.float32), np.zeros(1, np.int64), None, None)
    with pytest.raises(UserError, match="at least 2 training rows"):
        train_backbone(_tiny_with_1x1_batchnorm(), ds, epochs=1, progress=False)


def _probe(feats: torch.Tensor, y: torch.Tensor) -> torch.nn.Linear:
    """A linear probe fitted to convergence (L-BFGS, full batch): what a linear head can reach."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(feats.shape[1], 10)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(feats), y) + 1e-4 * (probe.weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def test_gates_on_small_data_reach_a_linear_probe(data, backbone):
    """192 rows at batch 256 are one optimizer step an epoch: `--epochs 1` left the gates at chance where a
    linear probe on the same features reached 45-72%. Training counts optimizer steps (MIN_GATE_STEPS)."""
    train, val = data
    small = train.subset(192, seed=1)
    gated = gated_of(backbone, "linear")
    accs = train_gates(gated, small, epochs=1, batch_size=256, progress=False)
    feats = cache_gate_features(gated, small, progress=False)
    val_feats = cache_gate_features(gated, val, progress=False)
    y, val_y = torch.from_numpy(small.y), torch.from_numpy(val.y)
    held = exit_accuracies(gated, val)[:3]
    with torch.no_grad():
        for k in range(3):
            probe = _probe(feats[k], y)
            probe_train = float((probe(feats[k]).argmax(1) == y).float().mean())
            probe_held = float((probe(val_feats[k]).argmax(1) == val_y).float().mean())
            assert probe_held > 0.3  # a learnable set: far above chance (0.1)
            assert accs[k] >= probe_train - 0.05, (k, accs, probe_train)
            assert held[k] >= probe_held - 0.05, (k, held, probe_held)
