"""D-gate heads and confidence measures (torch).

A head pools the features (no parameters: globally, or to a small grid) and classifies the pooled
vector, so frozen-backbone training can cache pooled features once and train `classify` alone. Heads
are chosen by name from a small registry and built for one exit's feature shape (C, H, W). The
confidence measures mirror `dgate_export.confidence` (numpy), all scaled to [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UserError

CONFIDENCES = ("max-softmax", "margin", "entropy")


class GateHead(nn.Module):
    def pool(self, features: torch.Tensor) -> torch.Tensor:
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

    Global pooling keeps which features fired but not where; in early layers, whose channels are few,
    the where is most of what there is (Fashion-MNIST, ResNet-56's first stage: 75% validation
    accuracy from a globally pooled MLP head against 94% for the whole network). A cell is k x k
    pixels, k the smallest divisor of the side that leaves at most `grid` cells (28 -> 4 cells of 7,
    14 -> 2 of 7, 7 -> 1), so the pooling is one reshape and one mean, exact in every exporter.
    (An AveragePool with kernel = stride = k gives the same values; in ONNX Runtime's CPU provider it
    made DenseNet-BC's first segment 22-28% slower and ResNet-56's 3% faster, so it is not used.)
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

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        if len(self.cell) != 2:  # not an image feature map: pool globally as the other heads
            return super().pool(features)
        (kh, kw), (gh, gw) = self.cell, self.cells
        return features.reshape(-1, self.channels, gh, kh, gw, kw).mean(dim=(3, 5)).flatten(1)


HEADS: dict[str, type[GateHead]] = {"linear": LinearHead, "mlp": MLPHead, "grid": GridHead}


def list_heads() -> list[str]:
    return list(HEADS)


def make_head(name: str, in_shape: tuple[int, ...], num_classes: int, **kwargs) -> GateHead:
    """Head `name` for one exit's per-sample feature shape (C, H, W), or (C,) for vectors."""
    if name not in HEADS:
        raise UserError(f"Unknown gate head {name!r}.", f"Choose one of: {', '.join(HEADS)}.")
    try:
        return HEADS[name](tuple(in_shape), num_classes, **kwargs)
    except TypeError as err:
        raise UserError(f"Gate head {name!r} does not accept these arguments: {err}.") from err


def check_confidence(name: str) -> str:
    if name not in CONFIDENCES:
        raise UserError(f"Unknown confidence measure {name!r}.", f"Choose one of: {', '.join(CONFIDENCES)}.")
    return name


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
