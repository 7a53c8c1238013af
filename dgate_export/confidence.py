"""Confidence measures in numpy, each scaled to [0, 1] (1 = sure). Never imports torch.

The same measures exist in torch (`gates.confidence_torch`) and inside the exported graphs; the three
must agree (tests/test_confidence.py checks numpy against torch). A sample leaves at a gate when its
confidence is >= the gate's threshold.

- "max-softmax": the largest softmax probability.
- "margin": top-1 minus top-2 softmax probability.
- "entropy": 1 - H(p) / log(classes), H the softmax entropy in nats.
"""

from __future__ import annotations

import numpy as np

from .contract import CONFIDENCES
from .errors import UserError


def check_confidence_name(name: str) -> str:
    if name not in CONFIDENCES:
        raise UserError(f"Unknown confidence measure {name!r}.", f"Choose one of: {', '.join(CONFIDENCES)}.")
    return name


def lowest(name: str, num_classes: int) -> float:
    """The smallest confidence measure `name` can give with `num_classes` classes: max-softmax is at least
    1/classes (uniform probabilities); margin and entropy reach 0. A threshold below it lets every sample
    leave, like one at it, so calibration never chooses one below it."""
    check_confidence_name(name)
    return 1.0 / num_classes if name == "max-softmax" and num_classes > 0 else 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, shifted by the row max so that exp never overflows."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def confidence(name: str, logits: np.ndarray) -> np.ndarray:
    """Confidence [N] (float32, in [0, 1]) of logits [N, classes] under measure `name`."""
    check_confidence_name(name)
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise UserError(f"Confidence needs logits of shape [N, classes>=2]; got {logits.shape}.",
                        "Pass the class scores of a classifier.")
    logp = log_softmax(logits)
    p = np.exp(logp)
    if name == "max-softmax":
        c = p.max(axis=1)
    elif name == "margin":
        top2 = np.partition(p, -2, axis=1)[:, -2:]
        c = top2[:, 1] - top2[:, 0]
    else:
        # p * log p -> 0 as p -> 0; where p underflowed to 0 the product is 0 (logp is finite).
        h = -(p * logp).sum(axis=1)
        c = 1.0 - h / np.log(logits.shape[1])
    return np.clip(c, 0.0, 1.0).astype(np.float32)
