"""Architectures by name: a small zoo for 28×28 inputs, any torchvision classifier, and user factories.

Names: the zoo's plain names (`resnet20`, `resnet56`, `densenet_bc`, ...), `torchvision/NAME` for any
torchvision classification model, and names registered by the user's own code with `register_arch`.
A checkpoint records only the name and the constructor arguments, so loading one never imports code
chosen by the file: a user architecture must be registered by a module the user imports (`--import`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class ArchInfo:
    name: str
    factory: Callable[..., nn.Module]
    description: str = ""
    default_exits: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, ArchInfo] = {}


def register_arch(name: str, factory: Callable[..., nn.Module], *, default_exits=(), description=""):
    """Register `factory(**kwargs) -> nn.Module` under `name` (usable by `--arch name`)."""
    if name.startswith("torchvision/"):
        raise ValueError("names starting with 'torchvision/' are reserved")
    _REGISTRY[name] = ArchInfo(name, factory, description, tuple(default_exits))
    return factory


def list_archs() -> list[ArchInfo]:
    return sorted(_REGISTRY.values(), key=lambda a: a.name)


def arch_registered(name: str) -> bool:
    """Whether `name` builds here: the zoo, `torchvision/...` or registered by the user's own code."""
    return name.startswith("torchvision/") or name in _REGISTRY


def registered_arch_name(backbone: nn.Module) -> str | None:
    """The registered name whose factory is the backbone's class itself (None: none is)."""
    return next((a.name for a in _REGISTRY.values() if a.factory is type(backbone)), None)


def arch_info(name: str) -> ArchInfo:
    if name.startswith("torchvision/"):
        tv_name = name.split("/", 1)[1]
        return ArchInfo(name, _torchvision_factory(tv_name), "torchvision model", _torchvision_exits(tv_name))
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"Did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"Unknown architecture {name!r}.",
            f"{hint}Zoo: {', '.join(_REGISTRY)}; any torchvision classifier as 'torchvision/NAME'; "
            "your own architecture: register it with dgate_export.compile.register_arch in a module you trust "
            "and pass that module with `dgate-export --import MODULE`.",
        )
    return _REGISTRY[name]


def build_backbone(name: str, kwargs: dict | None = None) -> nn.Module:
    info = arch_info(name)
    try:
        model = info.factory(**(kwargs or {}))
    except TypeError as err:
        raise UserError(f"Architecture {name!r} does not accept these arguments: {err}.",
                        "Check --arch-kwargs.") from err
    return model.eval()


def _torchvision_factory(tv_name: str) -> Callable[..., nn.Module]:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if tv_name not in available:
        close = difflib.get_close_matches(tv_name, available, n=3)
        raise UserError(
            f"torchvision has no classification model {tv_name!r}.",
            f"Did you mean {', '.join(close)}?" if close else "See torchvision.models.list_models().",
        )

    def factory(**kwargs):
        if kwargs.get("weights") not in (None, "None"):
            raise UserError("Pretrained torchvision weights cannot be downloaded here.",
                            "Train or load weights with --weights backbone.pth instead.")
        kwargs.pop("weights", None)
        return torchvision.models.get_model(tv_name, weights=None, **kwargs)

    return factory


def _torchvision_exits(tv_name: str) -> tuple[str, ...]:
    if tv_name.startswith(("resnet", "resnext", "wide_resnet")):
        return ("layer1", "layer2", "layer3")
    if tv_name.startswith("densenet"):
        return ("features.transition1", "features.transition2", "features.transition3")
    return ()


# --- CIFAR-style ResNet (He et al. 2016, sec. 4.2), sized for 28×28 grayscale ---------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            # Option B (1×1 projection): plain modules, so the graph traces and exports cleanly.
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """depth = 6n + 2; three stages of n blocks with `width`, 2·width, 4·width channels.

    `stem_stride=2` halves the resolution before the first stage (28×28 -> 14×14): four times fewer
    FLOPs, so deeper networks train on a CPU in reasonable time."""

    def __init__(self, depth: int = 20, width: int = 16, in_channels: int = 1, num_classes: int = 10,
                 stem_stride: int = 1):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise UserError(f"ResNet depth {depth} is not of the form 6n+2 (20, 32, 44, 56, 110...).")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(width, width, n, 1)
        self.layer2 = self._stage(width, 2 * width, n, 2)
        self.layer3 = self._stage(2 * width, 4 * width, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet_exits(depth: int) -> tuple[str, ...]:
    n = (depth - 2) // 6
    # about one third, one half and two thirds of the depth: early gates save the most.
    # ("layer2" itself would equal "layer2.{n-1}", but exits may not nest, so name the block.)
    return ("layer1", f"layer2.{max(n // 2 - 1, 0)}", f"layer2.{n - 1}")


for _depth in (20, 32, 44, 56, 110):
    register_arch(
        f"resnet{_depth}",
        lambda _d=_depth, **kw: CifarResNet(depth=_d, **kw),
        default_exits=_resnet_exits(_depth),
        description=f"CIFAR-style ResNet-{_depth} (kwargs: width=16, in_channels=1, num_classes=10, stem_stride=1)",
    )


# --- DenseNet-BC (Huang et al. 2017), small, for 28×28 grayscale -----------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-1×1 conv (bottleneck) - BN-ReLU-3×3 conv; returns the input with the new maps appended,
    so every layer's output is the block's full state (a gate can sit after any layer)."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        new = self.conv2(self.relu(self.norm2(self.conv1(self.relu(self.norm1(x))))))
        return torch.cat([x, new], 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2))


class DenseNetBC(nn.Module):
    """depth = 6n + 4 (three dense blocks of n bottleneck layers), compression 0.5; `stem_stride` as
    for the ResNet."""

    def __init__(self, depth: int = 40, growth: int = 12, in_channels: int = 1, num_classes: int = 10,
                 stem_stride: int = 1):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise UserError(f"DenseNet-BC depth {depth} is not of the form 6n+4 (40, 64, 100...).")
        n = (depth - 4) // 6
        channels = 2 * growth
        blocks: list[tuple[str, nn.Module]] = [("conv0", nn.Conv2d(in_channels, channels, 3, stem_stride, 1, bias=False))]
        for b in range(1, 4):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            blocks.append((f"denseblock{b}", nn.Sequential(*layers)))
            if b < 3:
                blocks.append((f"transition{b}", Transition(channels, channels // 2)))
                channels //= 2
        blocks += [("norm5", nn.BatchNorm2d(channels)), ("relu5", nn.ReLU())]
        self.features = nn.Sequential()
        for name, module in blocks:
            self.features.add_module(name, module)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _densenet_exits(depth: int) -> tuple[str, ...]:
    n = (depth - 4) // 6
    # The first dense block runs at full resolution and costs about two thirds of the FLOPs, so the
    # first gate sits inside it (about 30% of the cost), the others at 73% and 82%.
    return (f"features.denseblock1.{n // 2 - 1}", "features.transition1", f"features.denseblock2.{n // 2 - 1}")


for _depth in (40, 64, 100):
    register_arch(
        "densenet_bc" if _depth == 40 else f"densenet_bc{_depth}",
        lambda _d=_depth, **kw: DenseNetBC(depth=_d, **kw),
        default_exits=_densenet_exits(_depth),
        description=f"DenseNet-BC-{_depth} (kwargs: growth=12, in_channels=1, num_classes=10, stem_stride=1)",
    )
