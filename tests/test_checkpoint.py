"""model.pt: round trip with weights_only loading; bad files refused without running anything."""

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from dgate_export.compile import checkpoint, zoo
from dgate_export.compile.model import GatedModel
from dgate_export.errors import UserError


def small_model(**kw):
    kwargs = {"num_classes": 10, "width": 4}
    backbone = zoo.build_backbone("resnet20", kwargs)
    return GatedModel(backbone, ["layer1", "layer2.0"], arch={"name": "resnet20", "kwargs": kwargs},
                      num_classes=10, input_shape=(1, 28, 28), thresholds=[0.9, 0.8],
                      class_names=[f"c{i}" for i in range(10)], **kw)


def test_round_trip(tmp_path):
    model = small_model(head="mlp", head_kwargs={"hidden": 8}, confidence="margin",
                        normalization={"scale": 1 / 255, "mean": [0.5], "std": [0.25]})
    with torch.no_grad():  # make the heads non-trivial so equality means something
        for p in model.heads.parameters():
            p.normal_()
    record = {"target": {"max_drop": 0.02, "guarantee": "none"}, "thresholds": [0.9, 0.8],
              "exit_fractions": [0.5, 0.3, 0.2], "rows": 100}
    model.calibration = record
    path = checkpoint.save(model, tmp_path / "model.pt")
    loaded = checkpoint.load(path)
    assert loaded.calibration == record
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)
    assert loaded.thresholds == [0.9, 0.8] and loaded.confidence == "margin"
    assert loaded.head_spec == {"name": "mlp", "kwargs": {"hidden": 8}}
    assert loaded.class_names == model.class_names and loaded.normalization == model.normalization
    assert loaded.flops == model.flops and loaded.flops["baseline"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": evil}, path)
    with pytest.raises(UserError, match="refused"):
        checkpoint.load(path)
    assert not marker.exists()
    # the same with a raw pickle rather than torch's zip container
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(evil))
    with pytest.raises(UserError):
        checkpoint.load(raw)
    assert not marker.exists()


def test_truncated_and_foreign_files(tmp_path):
    path = checkpoint.save(small_model(), tmp_path / "model.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated|corrupt"):
        checkpoint.load(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="not a gated checkpoint, or it is corrupt"):
        checkpoint.load(tmp_path / "text.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match="not a gated checkpoint"):
        checkpoint.load(tmp_path / "state.pt")
    with pytest.raises(UserError, match="no such file"):
        checkpoint.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_junk_in_a_torch_zip_is_called_corrupt_without_weights_only_advice(tmp_path, seed):
    """A torch-style zip holding random bytes: not a gated checkpoint, never "load it unsafely"."""
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", np.random.default_rng(seed).bytes(2000))
        archive.writestr("archive/version", "3\n")
    with pytest.raises(UserError) as info:
        checkpoint.load(path)
    text = str(info.value)
    assert "not a gated checkpoint, or it is corrupt" in text
    assert "weights_only" not in text and "will likely succeed" not in text and "could run code" not in text


@pytest.mark.slow
def test_module_versions_survive_the_round_trip(tmp_path):
    """torchvision's MNASNet refuses a state dict without `_metadata` (module versions)."""
    torchvision = pytest.importorskip("torchvision")
    kwargs = {"num_classes": 10}
    backbone = zoo.build_backbone("torchvision/mnasnet0_5", kwargs)
    model = GatedModel(backbone, ["layers.8"], arch={"name": "torchvision/mnasnet0_5", "kwargs": kwargs},
                       num_classes=10, input_shape=(3, 32, 32))
    model.flops = {"segments": [0, 0], "heads": [0], "baseline": 1}  # not what this test is about
    loaded = checkpoint.load(checkpoint.save(model, tmp_path / "m.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), loaded(x)))
    # a file written without the versions (older checkpoints) gets this code's module versions
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["backbone"] = dict(payload["backbone"])
    torch.save(payload, tmp_path / "old.pt")
    checkpoint.load(tmp_path / "old.pt")
    assert isinstance(torchvision.models.MNASNet, type)


def test_unknown_architecture_names_the_fix(tmp_path):
    path = checkpoint.save(small_model(), tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["arch"]["name"] = "my_private_net"
    torch.save(payload, tmp_path / "custom.pt")
    with pytest.raises(UserError, match="--import"):
        checkpoint.load(tmp_path / "custom.pt")


def test_user_registered_architecture(tmp_path):
    zoo.register_arch("tiny_test_net", lambda **kw: zoo.CifarResNet(depth=8, width=4, **kw),
                      default_exits=("layer1",))
    backbone = zoo.build_backbone("tiny_test_net", {"num_classes": 10})
    model = GatedModel(backbone, ["layer1"], arch={"name": "tiny_test_net", "kwargs": {"num_classes": 10}},
                       num_classes=10, input_shape=(1, 28, 28))
    loaded = checkpoint.load(checkpoint.save(model, tmp_path / "m.pt"))
    assert loaded.arch["name"] == "tiny_test_net"
