"""The Python API (dgate_export.compile): a user's own model class (defined here, never registered) and
custom head modules, trained from torch data, calibrated, built from memory, run by GatedRuntime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dgate_export.compile import (
    BenchOptions,
    Target,
    attach_gates,
    bench_bundle,
    build_bundle,
    calibrate_gates,
    load_model,
    save_model,
    train_gates,
)
from dgate_export.compile.train import train_backbone
from dgate_export.data import DEFAULT_FMNIST_DIR, Dataset, load_dataset
from dgate_export.errors import UserError
from dgate_export.runtime import GatedRuntime

pytestmark = pytest.mark.skipif(
    not (DEFAULT_FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


class MyNet(nn.Module):
    """A user's own classifier: in no registry."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())      # 14x14
        self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())  # 7x7
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.block2(self.block1(self.stem(x))))


class MyHead(nn.Module):
    """A user's own exit head (SDN style: a convolution before pooling), not a GateHead, no pool split."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class Images(torch.utils.data.Dataset):
    """A user's torch Dataset: (image tensor [1, 28, 28], int label)."""

    def __init__(self, ds: Dataset):
        self.x, self.y = ds.x, ds.y
        self.classes = ds.class_names

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), int(self.y[i])


@pytest.fixture(scope="module")
def splits():
    train = load_dataset("fashion-mnist", "train", val_size=500).subset(1500, seed=0)
    val = load_dataset("fashion-mnist", "val", val_size=500).subset(400, seed=1)
    test = load_dataset("fashion-mnist", "test").subset(300, seed=2)
    return train, val, test


@pytest.fixture(scope="module")
def trained_net(splits):
    torch.manual_seed(0)
    return train_backbone(MyNet(), splits[0], epochs=1, batch_size=32, progress=False)


def test_own_model_and_heads_end_to_end(splits, trained_net, tmp_path):
    """attach (custom heads at two exits) -> train (DataLoader) -> calibrate (torch Dataset) -> build from
    memory -> GatedRuntime agrees with the torch early-exit pass on real rows."""
    train, val, test = splits
    heads = [MyHead(8, 10), MyHead(16, 10)]
    gated = attach_gates(trained_net, ["stem", "block1"], head=heads, data=Images(train))
    assert gated.input_shape == (1, 28, 28) and gated.num_classes == 10
    assert gated.class_names == train.class_names and gated.arch["name"] == "MyNet"
    assert [h.module for h in gated.heads] == heads and gated.feature_layouts == ["raw", "raw"]
    before = {k: v.clone() for k, v in trained_net.state_dict().items()}

    loader = DataLoader(Images(train), batch_size=100, shuffle=True)
    trained = train_gates(gated, loader, epochs=10, batch_size=64, progress=False)
    assert trained.rows == len(train) and min(trained.accuracy) > 0.25  # 10 classes: chance is 0.1
    assert trained.cache_bytes_per_row == 4 * (8 * 14 * 14 + 16 * 7 * 7)  # no pool split: the exit outputs
    assert all(torch.equal(before[k], v) for k, v in trained_net.state_dict().items())  # backbone frozen

    done = calibrate_gates(gated, Images(val), test=(test.x, test.y), target=Target(budget=0.7), progress=False)
    assert gated.thresholds == done.thresholds and done.test is not None and done.test.samples == len(test)
    assert done.calibration.validation.expected_flops <= 0.7 * done.calibration.validation.baseline_flops

    bundle = build_bundle(gated, tmp_path / "bundle", progress=None)
    rt = GatedRuntime.load(bundle)
    assert [s.gate.head for s in rt.manifest.segments if s.gate] == ["MyHead", "MyHead"]
    ref = gated.early_exit(torch.from_numpy(val.x))  # thresholds chosen on these rows: none sits on one
    res = rt.run(val.x)
    assert np.array_equal(res.exits, ref.exits.numpy())
    np.testing.assert_allclose(res.logits, ref.logits.numpy(), rtol=1e-3, atol=1e-4)
    # thresholds under which every exit is taken (the calibrated ones may leave one unused): each head checked
    spread = next([t, t] for t in (0.3, 0.5, 0.7, 0.9, 0.95, 0.99)
                  if set(np.unique(gated.early_exit(torch.from_numpy(val.x), [t, t]).exits.numpy())) == {0, 1, 2})
    ref_all = gated.early_exit(torch.from_numpy(val.x), spread)
    res_all = rt.run(val.x, thresholds=spread)
    assert np.array_equal(res_all.exits, ref_all.exits.numpy())
    np.testing.assert_allclose(res_all.logits, ref_all.logits.numpy(), rtol=1e-3, atol=1e-4)

    # Self-contained: a fresh process with torch made unimportable (so neither MyNet nor any registry) runs it.
    np.save(tmp_path / "x.npy", val.x)
    code = ("import sys; sys.modules['torch'] = None; import numpy as np; "
            "from dgate_export.runtime import GatedRuntime; "
            f"r = GatedRuntime.load({str(bundle)!r}).run(np.load({str(tmp_path / 'x.npy')!r})); "
            f"np.save({str(tmp_path / 'exits.npy')!r}, r.exits)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    assert np.array_equal(np.load(tmp_path / "exits.npy"), res.exits)

    # bench_bundle: the report's gated accuracy is the runtime's on the same rows.
    report = bench_bundle(bundle, Images(test), options=BenchOptions(batch_sizes=(1, 8), warmup_ms=5, min_iterations=2,
                                                                     min_seconds=0.05), progress=False)
    assert report["data"]["samples"] == len(test) and [e["batch_size"] for e in report["speed"]] == [1, 8]
    assert report["accuracy"]["gated"] == pytest.approx(float((rt.run(test.x).predictions == test.y).mean()))
    rt.close()


def test_pool_split_of_a_sequential_head_is_cached_not_the_exit_output(splits, trained_net):
    head = lambda shape, n: nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(shape[0] * 4, n))
    gated = attach_gates(trained_net, ["stem", "block1"], head=head, input_shape=(1, 28, 28))
    assert gated.head_spec["name"] == "<lambda>"
    assert [h.pooled_by for h in gated.heads] == ["AdaptiveAvgPool2d, Flatten"] * 2
    trained = train_gates(gated, (splits[0].x[:300], splits[0].y[:300]), epochs=1, progress=False)
    assert trained.cache_bytes_per_row == 4 * (8 * 4 + 16 * 4)

    class Split(nn.Module):  # its own pool / classify pair: the pooled vector (C floats) is what is cached
        def __init__(self, channels):
            super().__init__()
            self.fc = nn.Linear(channels, 10)

        def pool(self, x):
            return x.mean(dim=(2, 3))

        def classify(self, pooled):
            return self.fc(pooled)

        def forward(self, x):
            return self.classify(self.pool(x))

    gated = attach_gates(trained_net, ["stem", "block1"], head=[Split(8), Split(16)], input_shape=(1, 28, 28))
    assert [h.pooled_by for h in gated.heads] == ["Split.pool"] * 2
    assert train_gates(gated, (splits[0].x[:300], splits[0].y[:300]), epochs=1, progress=False).cache_bytes_per_row == 96


def test_a_head_whose_pooling_indexes_exports_a_valid_graph(trained_net, tmp_path):
    """AdaptiveAvgPool2d(2) on block1's 7x7 output has uneven bins: the dynamo exporter decomposes it into
    an aten.index whose value it names "index", the name of segment 1's input; the graph must stay valid."""
    import onnx

    from dgate_export.compile.export import export_segment

    head = lambda shape, n: nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(shape[0] * 4, n))
    gated = attach_gates(trained_net, ["stem", "block1"], head=head, input_shape=(1, 28, 28))
    graph = export_segment(gated, 1, tmp_path / "segment1.onnx", max_batch=8)
    onnx.checker.check_model(str(graph.path), full_check=True)
    assert [t["name"] for t in graph.inputs] == ["prev_carry_0", "index"]


def test_gates_train_from_a_generator_of_batches_read_once(splits, trained_net):
    train = splits[0]
    gated = attach_gates(trained_net, ["stem", "block1"], head="linear", input_shape=(1, 28, 28))
    batches = ((torch.from_numpy(train.x[i:i + 100]), torch.from_numpy(train.y[i:i + 100])) for i in range(0, 600, 100))
    trained = train_gates(gated, batches, epochs=2, progress=False)
    assert trained.rows == 600 and len(trained.accuracy) == 2
    with pytest.raises(UserError, match=r"gave no batches \(an iterator that was read before gives none\)"):
        calibrate_gates(gated, batches, progress=False)  # the validation rows must be other rows anyway


def test_an_iterator_of_unknown_length_gives_the_features_and_logits_of_the_rows(splits, trained_net):
    """Its arrays grow as they fill (1500 rows: past the first allocation of 1024), in order."""
    from dgate_export.compile import as_rows
    from dgate_export.compile.train import cache_gate_features, collect_exit_logits

    train = splits[0]
    gated = attach_gates(trained_net, ["stem", "block1"], head="grid", input_shape=(1, 28, 28))

    def batches():
        return as_rows((train.x[i:i + 100], train.y[i:i + 100]) for i in range(0, len(train), 100))

    for a, b in zip(cache_gate_features(gated, train, batch_size=100, progress=False),
                    cache_gate_features(gated, batches(), batch_size=100, progress=False)):
        assert a.shape == b.shape == (len(train), a.shape[1]) and torch.equal(a, b)
    (ref, y_ref), (got, y_got) = (collect_exit_logits(gated, d, batch_size=100, progress=False)
                                  for d in (train, batches()))
    assert np.array_equal(y_ref, y_got) and all(np.array_equal(a, b) for a, b in zip(ref, got))


def test_heads_given_by_name_and_factory(trained_net):
    gated = attach_gates(trained_net, ["stem", "block1"], head="grid", head_kwargs={"hidden": 8},
                         input_shape=(1, 28, 28))
    assert gated.feature_layouts == ["nchw", "nchw"] and gated.head_spec == {"name": "grid", "kwargs": {"hidden": 8}}
    mixed = attach_gates(trained_net, ["stem", "block1"], head=["linear", MyHead(16, 10)], input_shape=(1, 28, 28))
    assert mixed.head_specs == [{"name": "linear", "kwargs": {}}, {"name": "MyHead", "kwargs": {}}]
    assert mixed.feature_layouts == ["nchw", "raw"]


@pytest.mark.parametrize("kwargs, message", [
    ({"exits": ["stme"]}, "Exit 'stme' is not a module of the backbone"),
    ({"head": [MyHead(8, 10)]}, "1 heads given for 2 exits"),
    ({"head": [MyHead(16, 10), MyHead(16, 10)]}, "The gate head at exit 'stem' (MyHead) fails on the exit's output"),
    ({"head": [MyHead(8, 3), MyHead(16, 3)]}, "to [2, 3], not [N, 10] class scores"),
    ({"head": MyHead(8, 10)}, "One head module given for 2 exits"),
    ({"head": "gird"}, "Unknown gate head 'gird'"),
    ({"feature_layout": "nhwc", "head": [MyHead(8, 10), MyHead(16, 10)]}, "whose head is a custom module"),
    ({"input_shape": None}, "needs the input shape"),
    ({"num_classes": 7}, "not 7 class scores"),
])
def test_attach_refuses_with_a_clear_message(trained_net, kwargs, message):
    args = {"exits": ["stem", "block1"], "input_shape": (1, 28, 28), **kwargs}
    with pytest.raises(UserError) as err:
        attach_gates(trained_net, args.pop("exits"), **args)
    assert message in err.value.message


def test_the_same_head_module_twice_is_refused(trained_net):
    head = MyHead(8, 10)
    with pytest.raises(UserError, match="same head module"):
        attach_gates(trained_net, ["stem", "block1"], head=[head, head], input_shape=(1, 28, 28))


def test_pool_and_classify_must_compose_to_forward(trained_net):
    class Broken(MyHead):
        def pool(self, x):
            return x

        def classify(self, x):
            return self.fc(x.mean(dim=(2, 3)))  # skips the convolution

    with pytest.raises(UserError, match=r"classify\(pool\(x\)\) differs from forward\(x\)"):
        attach_gates(trained_net, ["stem"], head=[Broken(8, 10)], input_shape=(1, 28, 28))


def test_spec_data_records_the_split_and_calibrate_uses_it(trained_net, tmp_path):
    gated = attach_gates(trained_net, ["stem", "block1"], head="linear", data="fashion-mnist")
    assert gated.normalization is not None and gated.class_names is not None
    trained = train_gates(gated, "fashion-mnist", val_size=59000, epochs=1, progress=False)  # 1000 training rows
    assert trained.rows == 1000 and gated.data_split == {"data": "fashion-mnist", "val_size": 59000, "seed": 0}
    with pytest.raises(UserError, match="--val-size 500 would choose thresholds on other rows"):
        calibrate_gates(gated, "fashion-mnist", val_size=500, progress=False)
    saved = save_model(gated, tmp_path / "model.pt")
    assert saved.unregistered == ["architecture 'MyNet'"] and saved.curve_json is None


def test_unregistered_checkpoint_says_how_to_load_it(trained_net, tmp_path, monkeypatch):
    """build / inspect / calibrate model.pt of an unregistered model: one paragraph with the fix, nothing
    written; registered in a module given with --import, the same file loads."""
    import sys

    from click.testing import CliRunner

    from dgate_export.cli import main
    from dgate_export.compile import heads, zoo

    gated = attach_gates(trained_net, ["stem", "block1"], head=[MyHead(8, 10), MyHead(16, 10)],
                         input_shape=(1, 28, 28))
    saved = save_model(gated, tmp_path / "model.pt")
    assert saved.unregistered == ["architecture 'MyNet'", "gate head 'MyHead'"]
    model = str(saved.path)
    monkeypatch.chdir(tmp_path)
    for args in (["build", model], ["inspect", model], ["calibrate", model, "--data", "fashion-mnist"]):
        r = CliRunner().invoke(main, args)
        text = " ".join(r.output.split())
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert "was gated with architecture 'MyNet' and gate head 'MyHead', not registered in this process" in text
        assert "`dgate-export --import mymodels build model.pt`" in text and "build_bundle(model, " in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # nothing written, no engines/
    with pytest.raises(UserError, match="not registered"):
        load_model(saved.path)

    (tmp_path / "mymodels.py").write_text(
        "from test_api import MyHead, MyNet\n"
        "from dgate_export.compile import register_arch, register_head\n"
        "register_arch('MyNet', MyNet)\n"
        "register_head('MyHead', lambda in_shape, num_classes: MyHead(in_shape[0], num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        r = CliRunner().invoke(main, ["--import", "mymodels", "inspect", model])
        assert r.exit_code == 0, r.output
        assert "MyNet" in r.output and "MyHead" in r.output
        loaded = load_model(saved.path)
        x = torch.from_numpy(load_dataset("fashion-mnist", "test").subset(16, seed=0).x)
        for a, b in zip(gated(x), loaded(x)):
            assert torch.equal(a, b)
    finally:
        zoo._REGISTRY.pop("MyNet", None)
        heads.HEADS.pop("MyHead", None)
        sys.modules.pop("mymodels", None)


def test_cli_gate_takes_a_head_registered_in_an_import_module(splits, tmp_path, monkeypatch):
    import sys

    from click.testing import CliRunner
    from tiny_arch import NAME, TinyCNN

    from dgate_export.cli import main
    from dgate_export.compile import heads

    train, val, test = splits
    npz = tmp_path / "data.npz"
    np.savez(npz, x_train=train.x[:600], y_train=train.y[:600], x_val=val.x, y_val=val.y, x_test=test.x,
             y_test=test.y)
    torch.save(TinyCNN().state_dict(), tmp_path / "bb.pth")
    (tmp_path / "myheads.py").write_text(
        "from torch import nn\n"
        "from dgate_export.compile import register_head\n"
        "def pooled(in_shape, num_classes, hidden=16):\n"
        "    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_shape[0], hidden), nn.ReLU(),\n"
        "                         nn.Linear(hidden, num_classes))\n"
        "register_head('pooled', pooled)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gate = ["gate", "--arch", NAME, "--weights", tmp_path / "bb.pth", "--data", f"npz:{npz}", "--epochs", 1,
            "--guarantee", "none", "--no-progress", "-o", tmp_path / "model.pt"]
    try:
        r = CliRunner().invoke(main, [str(a) for a in [*gate, "--head", "pooled"]])
        assert r.exit_code == 2 and "Unknown gate head 'pooled'" in r.output  # not imported: refused at once
        assert not (tmp_path / "model.pt").exists()
        r = CliRunner().invoke(main, [str(a) for a in ["--import", "myheads", *gate, "--head", "pooled"]])
        assert r.exit_code == 0, r.output
        model = load_model(tmp_path / "model.pt")
        assert model.head_spec == {"name": "pooled", "kwargs": {}} and model.feature_layouts == ["raw"] * 3
    finally:
        heads.HEADS.pop("pooled", None)
        sys.modules.pop("myheads", None)
