"""A tiny CNN registered in the zoo for fast training tests (a few thousand FLOPs per layer)."""

from __future__ import annotations

from torch import nn

from dgate_export.compile.zoo import register_arch

NAME = "test_tiny_cnn"
EXITS = ("stem", "stage1", "stage2")


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = _block(in_channels, width, 2)         # 14x14
        self.stage1 = _block(width, 2 * width, 2)         # 7x7
        self.stage2 = _block(2 * width, 4 * width, 1)
        self.stage3 = _block(4 * width, 4 * width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


register_arch(NAME, TinyCNN, default_exits=EXITS, description="tiny CNN for tests")
