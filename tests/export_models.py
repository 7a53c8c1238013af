"""Tiny hand-written backbones for the export and build tests, registered in the zoo on import.

- `test_skipnet`: a skip connection crosses the first cut, so segment 0 has two carries.
- `test_svdnet`: like skipnet, but its last segment calls torch.linalg.svdvals, which eager torch runs and
  the ONNX exporters reject: a build that fails midway (segments 0 and 1 export, segment 2 does not).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dgate_export import checkpoint, zoo
from dgate_export.gated import GatedModel


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


zoo.register_arch("test_skipnet", SkipNet, default_exits=("block1", "block2"), description="test: skip over a cut")
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
