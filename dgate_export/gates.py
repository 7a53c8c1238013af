"""D-gate heads and confidence measures (torch).

A head pools the features globally (no parameters) and classifies the pooled vector, so frozen-backbone
training can cache pooled features once and train `classify` alone. Heads are chosen by name from a
small registry. The confidence measures mirror `dgate_export.confidence` (numpy), all scaled to [0, 1].
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

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def classify(self, pooled):
        return self.fc(pooled)


class MLPHead(GateHead):
    """Pooling + one hidden layer: more capacity for early gates whose features are few."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def classify(self, pooled):
        return self.fc2(self.relu(self.fc1(pooled)))


HEADS: dict[str, type[GateHead]] = {"linear": LinearHead, "mlp": MLPHead}


def list_heads() -> list[str]:
    return list(HEADS)


def make_head(name: str, in_channels: int, num_classes: int, **kwargs) -> GateHead:
    if name not in HEADS:
        raise UserError(f"Unknown gate head {name!r}.", f"Choose one of: {', '.join(HEADS)}.")
    try:
        return HEADS[name](in_channels, num_classes, **kwargs)
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
