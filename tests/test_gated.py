"""The gated model: splitting, every exit, the reference early-exit pass, FLOPs."""

import pytest
import torch
from torch import nn

from dgate_export.compile.model import GatedModel
from dgate_export.compile.split import split_backbone
from dgate_export.compile.zoo import arch_info, build_backbone
from dgate_export.errors import UserError


def gate(name, shape, exits=None, **kw):
    kwargs = {"num_classes": 10}
    backbone = build_backbone(name, kwargs)
    exits = list(exits or arch_info(name).default_exits)
    return GatedModel(backbone, exits, arch={"name": name, "kwargs": kwargs}, num_classes=10,
                      input_shape=shape, **kw)


TORCHVISION = [("torchvision/resnet18", (3, 32, 32)), ("torchvision/densenet121", (3, 32, 32))]
ZOO = [("resnet20", (1, 28, 28)), ("densenet_bc", (1, 28, 28))]


@pytest.mark.parametrize("name,shape", TORCHVISION + ZOO)
def test_segments_reproduce_backbone_and_reference_pass(name, shape):
    model = gate(name, shape)
    assert model.num_gates == 3 and len(model.segments) == 4
    x = torch.randn(6, *shape)
    with torch.no_grad():
        ref = model.backbone(x)
        exits = model(x)
        assert len(exits) == 4
        assert (exits[-1] - ref).abs().max().item() < 1e-5
        never = model.early_exit(x, thresholds=[1.5] * 3)
        assert (never.logits - ref).abs().max().item() < 1e-5
        assert never.exits.tolist() == [3] * 6
        always = model.early_exit(x, thresholds=[0.0] * 3)
        assert always.exits.tolist() == [0] * 6
        assert torch.equal(always.logits, exits[0])


def test_early_exit_compacts_and_keeps_rows():
    model = gate("resnet20", (1, 28, 28))
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        every = model(x)
        from dgate_export.compile.heads import confidence_torch
        conf0 = confidence_torch("max-softmax", every[0])
        threshold = conf0.median().item()
        out = model.early_exit(x, thresholds=[threshold, 1.5, 1.5])
    leave = conf0 >= threshold
    assert 0 < leave.sum() < 32
    assert torch.equal(out.exits == 0, leave)
    assert torch.allclose(out.logits[leave], every[0][leave])
    # rows that went on were computed on a smaller batch, yet match the full-batch logits
    assert torch.allclose(out.logits[~leave], every[-1][~leave], atol=1e-5)
    assert torch.allclose(out.confidence[leave], conf0[leave])


class Skip(nn.Module):
    """stem -> a -> b, output uses b + stem: the stem's output crosses the cut after `a`."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        s = self.stem(x)
        y = self.b(self.a(s)) + s
        return self.fc(y.mean((2, 3)))


def test_skip_connection_is_carried_not_recomputed():
    model = Skip().eval()
    segments = split_backbone(model, ["a"], torch.zeros(2, 1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        carries = segments[0](x)
        assert len(carries) == 2  # the gate's features, then the skip
        assert torch.equal(carries[0], model.a(model.stem(x)))
        assert torch.equal(carries[1], model.stem(x))
        assert torch.allclose(segments[1](*carries)[0], model(x), atol=1e-6)
    # the second segment holds no copy of the stem: nothing is recomputed
    names = {n for n, _ in segments[1].named_modules()}
    assert "stem" not in names and "b" in names


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(1, 4, 3, padding=1)
        self.right = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], 1)
        return self.fc(y.mean((2, 3)))


class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: not traceable
            y = y * 2
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("model,exits,match", [
    (Skip(), ["nope"], "not a module"),
    (Skip(), ["a", "a.0"], "lies inside"),
    (Skip(), ["stem", "stem"], "twice"),
    (Skip(), ["b", "a"], "execution order"),
    (Branchy(), ["left"], "inside a branch"),
    (Dynamic(), ["conv"], "cannot be traced"),
])
def test_bad_cuts_are_clear_errors(model, exits, match):
    with pytest.raises(UserError, match=match):
        split_backbone(model.eval(), exits, torch.zeros(2, 1, 8, 8))


def test_flops_add_up():
    model = gate("resnet20", (1, 28, 28))
    flops = model.count_flops()
    assert sum(flops["segments"]) == flops["baseline"]
    assert all(h == 2 * c * 10 for h, c in zip(flops["heads"], (16, 32, 32)))
    costs = model.exit_costs()
    assert costs == sorted(costs) and costs[-1] == flops["baseline"] + sum(flops["heads"])
    assert model.expected_cost([1, 0, 0, 0]) == costs[0]


def test_grid_head_pools_cells_of_the_feature_map():
    """The grid head's pooling is adaptive average pooling to its cells, for sides that divide evenly,
    and its FLOPs (the two linear layers on C x cells features) are counted per exit."""
    from dgate_export.compile.heads import make_head

    for shape, cells in (((16, 28, 28), [4, 4]), ((32, 14, 14), [2, 2]), ((64, 7, 7), [1, 1]), ((8, 28, 14), [4, 2])):
        head = make_head("grid", shape, 10, hidden=32)
        assert head.cells == cells
        x = torch.randn(3, *shape)
        ref = torch.nn.functional.adaptive_avg_pool2d(x, cells).flatten(1)
        assert torch.allclose(head.pool(x), ref, atol=1e-6)
        assert head(x).shape == (3, 10)
    assert make_head("grid", (16, 28, 28), 10, grid=2).cells == [2, 2]
    assert make_head("grid", (10,), 10)(torch.randn(2, 10)).shape == (2, 10)  # vectors: nothing to pool
    with pytest.raises(UserError, match="grid >= 1"):
        make_head("grid", (16, 28, 28), 10, grid=0)

    model = gate("resnet20", (1, 28, 28), head="grid", head_kwargs={"hidden": 32})
    flops = model.count_flops()
    channels = [c[0].shape[1] for c in model.run_segments(torch.zeros(1, 1, 28, 28))[:-1]]
    for k, head in enumerate(model.heads):
        features = channels[k] * head.cells[0] * head.cells[1]
        assert flops["heads"][k] == 2 * (features * 32 + 32 * 10)


def _layout_model(arch, shape=(1, 8, 8), **kw):
    from export_models import gated

    return gated(arch, input_shape=shape, **kw)


@pytest.mark.parametrize("arch, kwargs, layout, pooled", [
    ("test_channels_last", {}, "nhwc", lambda f: f.mean(dim=(1, 2))),
    ("test_tokens", {}, "tokens-cls", lambda f: f[:, 0]),
    ("test_tokens", {"class_token": False}, "tokens-mean", lambda f: f.mean(dim=1)),
    ("resnet20", {}, "nchw", lambda f: f.mean(dim=(2, 3))),
])
@pytest.mark.parametrize("head", ["linear", "grid"])
def test_heads_detect_the_feature_layout(tmp_path, arch, kwargs, layout, pooled, head):
    """Heads pool over space (or take the class token / the mean over tokens), never over channels."""
    from dgate_export.compile import checkpoint

    shape = (1, 28, 28) if arch == "resnet20" else (1, 8, 8)
    model = _layout_model(arch, shape, kwargs=dict(kwargs), head=head)
    assert model.feature_layouts == [layout] * model.num_gates
    x = torch.randn(3, *shape)
    with torch.no_grad():
        features = model.run_segments(x)[0][0]
        p = model.heads[0].pool(features)
        if head == "linear":
            assert torch.allclose(p, pooled(features), atol=1e-6)
        else:  # grid cells of the channels-first map: their mean over cells is the global pool
            c = pooled(features).shape[1]
            assert torch.allclose(p.reshape(3, c, -1).mean(dim=2), pooled(features), atol=1e-5)
        loaded = checkpoint.load(checkpoint.save(model, tmp_path / "m.pt"))
        assert loaded.feature_layouts == model.feature_layouts
        assert all(torch.equal(a, b) for a, b in zip(model(x), loaded(x)))


def test_undetectable_layouts_are_refused_or_taken_from_the_user(tmp_path):
    from dgate_export.compile import checkpoint

    with pytest.raises(UserError, match=r"Cannot tell the layout of exit 'mix'.*\[N, 3, 5, 7\].*--feature-layout"):
        _layout_model("test_opaque")
    model = _layout_model("test_opaque", feature_layout="nhwc")
    assert model.feature_layouts == ["nhwc"] and model.heads[0].fc.in_features == 7
    assert checkpoint.load(checkpoint.save(model, tmp_path / "m.pt")).feature_layouts == ["nhwc"]
    with pytest.raises(UserError, match="'tokens-cls' does not fit exit 'mix'"):
        _layout_model("test_opaque", feature_layout="tokens-cls")
    with pytest.raises(UserError, match="Unknown feature layout 'nwhc'"):
        _layout_model("test_opaque", feature_layout="nwhc")
    with pytest.raises(UserError, match="2 feature layouts given for 1 exits"):
        _layout_model("test_opaque", feature_layout=["nchw", "nchw"])
