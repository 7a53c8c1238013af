"""Tiny hand-written backbones for the export and build tests, registered in the zoo on import.

- `test_skipnet`: a skip connection crosses the first cut, so segment 0 has two carries.
- `test_svdnet`: like skipnet, but its last segment calls torch.linalg.svdvals, which eager torch runs and
  the ONNX exporters reject: a build that fails midway (segments 0 and 1 export, segment 2 does not).
- `test_numpytail`: like skipnet, but its tail computes in numpy (with an ONNX `symbolic`): the dynamo
  exporter fails on it, the TorchScript exporter does not (build's automatic fallback).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dgate_export.compile import checkpoint, zoo
from dgate_export.compile.model import GatedModel


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SkipNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 4, width: int = 4):
        super().__init__()
        self.stem = _block(in_channels, width)
        self.block1 = _block(width, width)
        self.block2 = _block(width, width)
        self.block3 = _block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        s = self.stem(x)
        a = self.block1(s)  # exit "block1": s is still needed after it
        b = self.block2(a) + s  # the skip connection over the first cut
        return self.fc(self.tail(self.block3(b)))

    def tail(self, c):
        return c.mean(dim=(2, 3))


class SvdNet(SkipNet):
    def tail(self, c):
        # torch.linalg.svdvals has no ONNX export: the last segment cannot be exported.
        return c.mean(dim=(2, 3)) * torch.linalg.svdvals(c.flatten(2)).mean(dim=1, keepdim=True)


class _Doubled(torch.autograd.Function):
    """x * 2 computed in numpy: torch.export cannot trace it, so the dynamo exporter fails; the TorchScript
    exporter uses `symbolic` (an ONNX Mul) and succeeds."""

    @staticmethod
    def forward(ctx, x):
        return torch.from_numpy(x.detach().numpy() * 2)

    @staticmethod
    def symbolic(g, x):
        return g.op("Mul", x, g.op("Constant", value_t=torch.tensor(2.0)))


def doubled(x):
    return _Doubled.apply(x)


torch.fx.wrap("doubled")  # one opaque call for the split's tracing


class NumpyTailNet(SkipNet):
    def tail(self, c):
        return doubled(c).mean(dim=(2, 3))


zoo.register_arch("test_skipnet", SkipNet, default_exits=("block1", "block2"), description="test: skip over a cut")
zoo.register_arch("test_numpytail", NumpyTailNet, default_exits=("block1", "block2"),
                  description="test: only the TorchScript exporter exports it")
zoo.register_arch("test_svdnet", SvdNet, default_exits=("block1", "block2"), description="test: unexportable tail")


def randomize(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial statistics and heads non-trivial weights, so that folding, gathering
    and confidences are really exercised (fixed seed)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            if isinstance(m, nn.Linear):  # logits of a few units: confidences spread, not saturated
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 2 / m.in_features ** 0.5)
    return model


def gated(arch: str = "test_skipnet", exits=None, *, kwargs=None, input_shape=(1, 8, 8), num_classes=4,
          thresholds=None, **extra) -> GatedModel:
    kwargs = dict(kwargs or {})
    kwargs.setdefault("num_classes", num_classes)
    backbone = zoo.build_backbone(arch, kwargs)
    exits = list(exits or zoo.arch_info(arch).default_exits)
    model = GatedModel(backbone, exits, arch={"name": arch, "kwargs": kwargs}, num_classes=num_classes,
                       input_shape=input_shape, thresholds=thresholds, **extra)
    return randomize(model).eval()


def save(model: GatedModel, path: Path) -> Path:
    return checkpoint.save(model, path)


class ChannelsLastNet(nn.Module):
    """Swin-like: a patch convolution, then stages on [N, H, W, C] (LayerNorm and Linear on the last axis)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4, width: int = 6):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, width, 2, 2)
        self.stage1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.stage2 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)
        return self.fc(self.stage2(self.stage1(x)).mean(dim=(1, 2)))


class TokenNet(nn.Module):
    """ViT-like: patches as tokens [N, tokens, hidden], optionally a class token first."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4, hidden: int = 8, class_token: bool = True):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, hidden, 4, 4)
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden)) if class_token else None
        self.layer1 = nn.Sequential(_MixTokens(), nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU())
        self.layer2 = nn.Sequential(_MixTokens(), nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.layer2(self.layer1(x))
        return self.fc(x[:, 0] if self.class_token is not None else x.mean(dim=1))


class _MixTokens(nn.Module):
    """What attention does for the class token here: every token gets the mean of all of them."""

    def forward(self, x):
        return x + x.mean(dim=1, keepdim=True)


class OpaqueNet(nn.Module):
    """An exit whose modules do not show its layout: `mix` outputs [N, 3, 5, 7] from functional code."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4):
        super().__init__()
        self.mix = _Opaque()
        self.fc = nn.Linear(3 * 5 * 7, num_classes)

    def forward(self, x):
        return self.fc(self.mix(x).flatten(1))


class _Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3 * 5 * 7, 1))

    def forward(self, x):
        return (x.flatten(1).mean(dim=1, keepdim=True) @ self.weight.T).reshape(-1, 3, 5, 7)


zoo.register_arch("test_channels_last", ChannelsLastNet, default_exits=("stage1",), description="test: NHWC stages")
zoo.register_arch("test_tokens", TokenNet, default_exits=("layer1",), description="test: token sequences")
zoo.register_arch("test_opaque", OpaqueNet, default_exits=("mix",), description="test: undetectable layout")
