"""D-gate heads and confidence measures (torch).

A head pools the features (no parameters: globally, or to a small grid) and classifies the pooled
vector, so frozen-backbone training can cache pooled features once and train `classify` alone. Heads
are chosen by name from a small registry and built for one exit's feature shape (C, H, W). The
confidence measures mirror `dgate_export.confidence` (numpy), all scaled to [0, 1].

A user's own head is any `nn.Module` mapping an exit's output (as the backbone gives it, no layout
conversion: layout "raw") to class scores [N, classes]. It is wrapped in `CustomHead`, which finds the
part that can be cached during training (a `pool` / `classify` pair of the module's own, else the
leading pooling and flatten modules of an `nn.Sequential`, else nothing: the exit's whole output is
cached). `register_head(name, factory)` names a head factory like the built-in ones, so that a
checkpoint recording that name can be loaded (a checkpoint never holds code).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..confidence import check_confidence_name as check_confidence
from ..errors import UserError

LAYOUTS = ("nchw", "nhwc", "tokens-cls", "tokens-mean")
LAYOUT_HELP = ("nchw: channels first [N, C, ...] (convolutions); nhwc: channels last [N, H, W, C] (Swin, "
               "ConvNeXt blocks inside); tokens-cls: [N, tokens, hidden], the first token is a class token "
               "(ViT); tokens-mean: [N, tokens, hidden], averaged over tokens")


def channels_first(features: torch.Tensor, layout: str) -> torch.Tensor:
    """An exit's output in `layout` as channels-first features: [N, C, ...] maps, or [N, C] vectors."""
    if layout == "nhwc":
        return features.permute(0, 3, 1, 2)
    if layout == "tokens-cls":
        return features[:, 0]
    if layout == "tokens-mean":
        return features.mean(dim=1)
    return features


def layout_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The per-sample shape (no batch axis) of channels_first(features) for features of `shape`."""
    if layout == "nhwc":
        return (shape[2], shape[0], shape[1])
    if layout in ("tokens-cls", "tokens-mean"):
        return (shape[1],)
    return tuple(shape)


def check_layout(layout: str, shape: tuple[int, ...], where: str) -> str:
    """Refuse a layout that does not fit an exit's per-sample output shape."""
    if layout not in LAYOUTS:
        raise UserError(f"Unknown feature layout {layout!r} for {where}.", f"Choose one of: {LAYOUT_HELP}.")
    rank = len(shape) + 1
    fits = {"nchw": rank >= 2, "nhwc": rank == 4, "tokens-cls": rank == 3, "tokens-mean": rank == 3}[layout]
    if not fits:
        raise UserError(f"Feature layout {layout!r} does not fit {where}, whose output is [N, "
                        f"{', '.join(map(str, shape))}].", f"Choose one that does: {LAYOUT_HELP}.")
    return layout


class GateHead(nn.Module):
    layout = "nchw"  # of the exit's output; make_head sets it

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The exit's output -> the vector `classify` takes."""
        return self.pool_channels_first(channels_first(features, self.layout))

    def pool_channels_first(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() <= 2:
            return features
        return features.mean(dim=tuple(range(2, features.dim())))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(features))


class LinearHead(GateHead):
    """The paper's d-gate: global average pooling + one linear layer."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_shape[0], num_classes)

    def classify(self, pooled):
        return self.fc(pooled)


class MLPHead(GateHead):
    """Pooling + one hidden layer: more capacity for early gates whose features are few."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 128):
        super().__init__()
        self._mlp(in_shape[0], num_classes, hidden)

    def _mlp(self, features: int, num_classes: int, hidden: int) -> None:
        self.fc1 = nn.Linear(features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def classify(self, pooled):
        return self.fc2(self.relu(self.fc1(pooled)))


class GridHead(MLPHead):
    """Average pooling to a grid of at most `grid` x `grid` cells + one hidden layer.

    Global pooling keeps which features fired but not where, and in early layers with few channels the
    where is most of what there is. A cell is k x k pixels, k the smallest divisor of the side that
    leaves at most `grid` cells (28 -> 4 cells of 7, 14 -> 2 of 7, 7 -> 1): one reshape and one mean,
    exact in every exporter (an AveragePool is equal but was slower on ONNX Runtime's CPU provider).
    Figures: benchmarks/README.md, "Run 4, first try" and "Why batch-1 efficiency is 0.65-0.71".
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 128, grid: int = 4):
        GateHead.__init__(self)  # not MLPHead's: the MLP's input size depends on the cells
        if grid < 1:
            raise UserError(f"Gate head 'grid' needs grid >= 1, got {grid}.")
        self.channels, *spatial = (int(d) for d in in_shape)
        self.cell = [next(k for k in range(1, s + 1) if s % k == 0 and s // k <= grid) for s in spatial]
        self.cells = [s // k for s, k in zip(spatial, self.cell)]
        features = self.channels
        for c in self.cells:
            features *= c
        self._mlp(features, num_classes, hidden)

    def pool_channels_first(self, features: torch.Tensor) -> torch.Tensor:
        if len(self.cell) != 2:  # not an image feature map: pool globally as the other heads
            return super().pool_channels_first(features)
        (kh, kw), (gh, gw) = self.cell, self.cells
        return features.reshape(-1, self.channels, gh, kh, gw, kw).mean(dim=(3, 5)).flatten(1)


class CustomHead(GateHead):
    """A user's head module (any nn.Module: an exit's raw output -> class scores), as a GateHead.

    `forward` is the module's own (what is exported). `pool` / `classify` split it so that training can
    cache pooled features: the module's own `pool` and `classify` methods when it has both (they must
    compose to its forward, attach checks; `pool` runs once, so only `classify` trains), else for an
    `nn.Sequential` its leading pooling / flatten
    modules (parameter-free and the same in train and eval mode), else no split: pool is the identity
    and the exit's whole output is cached per row."""

    layout = "raw"

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.pooled_by = "nothing (the exit's whole output is cached)"
        self.prefix = 0  # leading pooling modules of a Sequential
        self.own_split = callable(getattr(module, "pool", None)) and callable(getattr(module, "classify", None))
        if self.own_split:
            self.pooled_by = f"{type(module).__name__}.pool"
        elif isinstance(module, nn.Sequential):
            for sub in module:
                if not isinstance(sub, _POOLING):
                    break
                self.prefix += 1
            if self.prefix:
                self.pooled_by = ", ".join(type(m).__name__ for m in list(module)[:self.prefix])

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        if self.own_split:
            return self.module.pool(features)  # type: ignore[operator]
        if self.prefix:
            return self.module[:self.prefix](features)  # type: ignore[index]
        return features

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.own_split:
            return self.module.classify(pooled)  # type: ignore[operator]
        if self.prefix:
            return self.module[self.prefix:](pooled)  # type: ignore[index]
        return self.module(pooled)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.module(features)


# Parameter-free modules that behave the same in train and eval mode: a custom nn.Sequential head's
# leading run of these is cached once during gate training.
_POOLING: tuple[type[nn.Module], ...] = (
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd, nn.Flatten, nn.Identity)


@dataclass(frozen=True)
class HeadInfo:
    name: str
    factory: Callable[..., nn.Module]  # factory(in_shape, num_classes, **kwargs) -> nn.Module
    description: str = ""
    builtin: bool = False


HEADS: dict[str, HeadInfo] = {
    "linear": HeadInfo("linear", LinearHead, "global average pooling + one linear layer (the paper's)", True),
    "mlp": HeadInfo("mlp", MLPHead, "global average pooling + one hidden layer (kwargs: hidden=128)", True),
    "grid": HeadInfo("grid", GridHead, "average pooling to at most 4x4 cells + one hidden layer "
                     "(kwargs: hidden=128, grid=4)", True),
}


def register_head(name: str, factory: Callable[..., nn.Module], *, description: str = "") -> Callable[..., nn.Module]:
    """Register `factory(in_shape, num_classes, **kwargs) -> nn.Module` under `name` (`head=name`,
    `--head name`), the way `zoo.register_arch` registers architectures: a checkpoint whose heads were
    made by it (or are instances of it, when it is a class) records `name` and loads where the module
    that registers it is imported (`dgate-export --import MODULE`). `in_shape` is the exit's output
    shape per sample, (C, H, W) for a feature map. A factory that returns a GateHead subclass gets the
    exit's output in channels-first layout (as the built-in heads do); any other module gets it raw."""
    if not name or name in HEADS and HEADS[name].builtin:
        raise ValueError(f"gate head name {name!r} is empty or built in")
    HEADS[name] = HeadInfo(name, factory, description)
    return factory


def list_heads() -> list[str]:
    return list(HEADS)


def head_info(name: str) -> HeadInfo:
    if name not in HEADS:
        raise UserError(f"Unknown gate head {name!r}.",
                        f"Choose one of: {', '.join(HEADS)}; or register your own with "
                        "dgate_export.compile.register_head in a module you import (`dgate-export --import MODULE`).")
    return HEADS[name]


def registered_name(head: object) -> str | None:
    """The registered name of a head factory, or of the class of a head module (None: not registered)."""
    for info in HEADS.values():
        if info.factory is head or (isinstance(info.factory, type) and type(head) is info.factory):
            return info.name
    return None


def is_gate_head_factory(factory: object) -> bool:
    """Whether `factory` makes GateHeads (the layout-aware kind), judged without calling it."""
    return isinstance(factory, type) and issubclass(factory, GateHead)


def wrap_head(module: nn.Module, layout: str = "raw") -> GateHead:
    """A head module as a GateHead: GateHeads as they are (their layout set), others in a CustomHead."""
    if isinstance(module, GateHead):
        module.layout = layout
        return module
    return CustomHead(module)


def make_head(name: str, in_shape: tuple[int, ...], num_classes: int, layout: str = "nchw", **kwargs) -> GateHead:
    """Head `name` for one exit's per-sample output shape `in_shape` in `layout` ((C, H, W) in nchw, (C,) for
    vectors). A registered factory that does not make GateHeads gets `in_shape` raw (layout ignored)."""
    return build_head(head_info(name).factory, name, in_shape, num_classes, layout, **kwargs)


def build_head(factory: Callable[..., nn.Module], name: str, in_shape: tuple[int, ...], num_classes: int,
               layout: str = "nchw", **kwargs) -> GateHead:
    """`factory(in_shape, num_classes, **kwargs)` as a GateHead (make_head, for a factory not registered)."""
    layered = is_gate_head_factory(factory)
    if layered:
        check_layout(layout, tuple(in_shape), f"a {name} head")
    try:
        head = factory(layout_shape(tuple(in_shape), layout) if layered else tuple(in_shape), num_classes, **kwargs)
    except TypeError as err:
        raise UserError(f"Gate head {name!r} does not accept these arguments: {err}.",
                        "A head factory is called as factory(in_shape, num_classes, **head_kwargs).") from err
    if not isinstance(head, nn.Module):
        raise UserError(f"Gate head factory {name!r} returned a {type(head).__name__}, not an nn.Module.")
    return wrap_head(head, layout if layered else "raw")


# Modules whose output shows where the channels are: (channels axis, the module's channel count).
_CHANNELS_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd)


def _channel_axis(module: nn.Module, shape: torch.Size) -> int | None:
    """1 or -1 when `module`'s output of `shape` has its channels on that axis; None when it does not say."""
    count: int | None
    if isinstance(module, nn.Linear):
        count = module.out_features
    elif isinstance(module, nn.LayerNorm):  # usually channels last; ConvNeXt's LayerNorm2d normalizes axis 1
        count = module.normalized_shape[-1] if len(module.normalized_shape) == 1 else None
    elif isinstance(module, _CHANNELS_FIRST):
        count = getattr(module, "out_channels", None) or getattr(module, "num_features", None) or getattr(
            module, "num_channels", None)
        return 1 if count is None or shape[1] == count else None
    else:
        return None
    if count is not None and shape[-1] == count:
        return -1
    if count is not None and shape[1] == count:
        return 1
    return None


def detect_layouts(backbone: nn.Module, exits: list[str], example: torch.Tensor) -> list[str | None]:
    """Each exit's output layout as its own modules show it, else None (undecided).

    One forward pass with hooks: the last module inside the exit (the exit included) whose output has
    the exit output's shape, up to the channel axis it names (a convolution's output [N, C', H, W]
    fits an exit output [N, C, H, W], DenseNet's concatenation) says where the channels are. Rank 3
    with channels last is a token sequence: "tokens-cls" where the backbone has a class token
    parameter (class_token, cls_token), else "tokens-mean". Rank 2 is a vector ("nchw", nothing to pool)."""
    seen: dict[str, list[tuple[nn.Module, torch.Size]]] = {e: [] for e in exits}
    outputs: dict[str, torch.Size] = {}
    handles = []
    for name, module in backbone.named_modules():
        owner = next((e for e in exits if name == e or name.startswith(e + ".")), None)
        if owner is None:
            continue

        def hook(mod, _inputs, out, owner=owner, name=name):
            if isinstance(out, torch.Tensor):
                seen[owner].append((mod, out.shape))
                if name == owner:
                    outputs[owner] = out.shape
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            backbone(example)
    finally:
        for h in handles:
            h.remove()
    has_class_token = any(n.rsplit(".", 1)[-1] in ("class_token", "cls_token") for n, _ in backbone.named_parameters())
    layouts: list[str | None] = []
    for e in exits:
        shape = outputs.get(e)
        if shape is None or len(shape) == 2:
            layouts.append("nchw")
            continue
        axis = None
        for mod, out in reversed(seen[e]):
            a = _channel_axis(mod, out)
            if a is not None and len(out) == len(shape) and _drop(out, a) == _drop(shape, a):
                axis = a
                break
        if axis == 1:
            layouts.append("nchw")
        elif axis == -1 and len(shape) == 4:
            layouts.append("nhwc")
        elif axis == -1 and len(shape) == 3:
            layouts.append("tokens-cls" if has_class_token else "tokens-mean")
        else:
            layouts.append(None)
    return layouts


def _drop(shape: torch.Size, axis: int) -> tuple[int, ...]:
    dims = list(shape[1:])  # not the batch axis
    del dims[axis - 1 if axis > 0 else axis]
    return tuple(dims)


def confidence_torch(name: str, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample confidence in [0, 1], computed in float32 (also for fp16 logits)."""
    check_confidence(name)
    logits = logits.float()
    if name == "max-softmax":
        return torch.softmax(logits, dim=1).amax(dim=1)
    if name == "margin":
        top2 = torch.topk(torch.softmax(logits, dim=1), 2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    log_p = torch.log_softmax(logits, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    return (1.0 - entropy / math.log(logits.shape[1])).clamp(0.0, 1.0)
