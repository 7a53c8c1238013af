"""Training: a backbone from scratch, and d-gate heads on a frozen backbone.

Gate training follows the d-gate recipe: the backbone is frozen, so the pooled features at every gate
are computed once (one forward pass over the training set) and each head's `classify` is then trained
on those cached vectors, which takes seconds. `collect_exit_logits` gives every exit's logits for
calibration and evaluation.

Every function reads its data through `data.Rows` (batches of rows), so memory does not grow with the
images: what is kept per row is the cache of pooled features (4 bytes x the features of every gate:
F_k = the exit's channels, times the cells for `grid` heads), the logits (4 bytes x classes per exit)
and the label.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Rows
from ..errors import UserError
from .threads import torch_threads

LOSSES = ("ce", "hinge")
# Gate heads train for at least MIN_GATE_STEPS optimizer steps, whatever the epochs: on small data an epoch
# is a step or two (192 rows at batch 256: one), and after --epochs 1 the heads stayed at chance where a
# linear probe on the same features reached 45-72%. Adam moves each weight about `lr` a step, so what the
# heads need is steps, not passes over the data; where the minimum sets the length (few rows, nearly
# exact gradients) the peak rate is SHORT_LR. Measured on 192 Fashion-MNIST rows (tests/test_train.py's
# tiny CNN; held-out accuracy of its 3 linear gates, a linear probe fitted to convergence: 45/64/72%):
# 300 steps at 1e-2 23/51/69%, 2000 at 1e-2 42/63/72%, 3000 at 1e-2 45/63/73% (14 s), 1000 at 5e-2
# 48/64/73% (4 s); mlp and grid heads alike. Large data is not affected: Fashion-MNIST's 10 default
# epochs are 2110 steps at 1e-2, as before.
MIN_GATE_STEPS = 1000
GATE_LR, SHORT_LR = 1e-2, 5e-2


def _batches(n: int, batch_size: int, rng: np.random.Generator | None, drop_single: bool = False):
    """Row indices per batch. `drop_single`: a last batch of one row joins the one before it (BatchNorm
    cannot train on one sample where the feature map is 1x1)."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    starts = _training_batch_starts(n, batch_size) if drop_single else list(range(0, n, batch_size))
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else n
        yield torch.from_numpy(order[start:stop])


def _training_batch_starts(n: int, batch_size: int) -> list[int]:
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return starts


def train_backbone(backbone: nn.Module, train_data: Rows, *, epochs: int, batch_size: int = 128,
                   lr: float = 0.1, weight_decay: float = 5e-4, seed: int = 0, progress: bool = True) -> nn.Module:
    """Train `backbone` with SGD (Nesterov momentum) and a one-cycle learning-rate schedule.

    One-cycle reaches good accuracy in one or two epochs, which is what a CPU demo can afford.
    No augmentation: the point is a reasonable backbone quickly, not the best one. The rows are read
    batch by batch in a seeded order per epoch (data.Rows). Returns the module in eval mode.
    """
    if epochs < 1:
        raise UserError(f"Backbone epochs must be >= 1 (got {epochs}).", "Pass --backbone-epochs 1 or more.")
    if len(train_data) < 2:
        raise UserError(f"Training the backbone needs at least 2 training rows; the data leaves {len(train_data)} "
                        "after the validation split.",
                        "Use more data or a smaller --val-size, or give trained weights with --weights.")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    steps = len(_training_batch_starts(len(train_data), batch_size))
    optimizer = torch.optim.SGD(backbone.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)
    total = epochs * steps
    # OneCycleLR divides by the warm-up's length, pct_start * total - 1 steps, which is 0 or less with
    # fewer than 8 steps (small data): warm up over 3 steps at least, and below 4 steps keep the rate.
    schedule: torch.optim.lr_scheduler.LRScheduler = (
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=max(0.25, 3 / total))
        if total >= 4 else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0))
    loss_fn = nn.CrossEntropyLoss()
    backbone.train()
    for epoch in range(epochs):
        seen, right, total_loss = 0, 0, 0.0
        bar = tqdm(_read(train_data, _batches(len(train_data), batch_size, rng, drop_single=True)), total=steps,
                   disable=not progress, desc=f"backbone epoch {epoch + 1}/{epochs}", unit="batch", leave=True)
        for xb, yb in bar:
            out = backbone(xb)
            loss = loss_fn(out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(yb)
            right += int((out.argmax(1) == yb).sum())
            total_loss += float(loss.detach()) * len(yb)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{right / seen:.3f}", refresh=False)
    return backbone.eval()


def _read(data: Rows, groups) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) tensors of each group of row indices (_batches': all of one size but the last), read through
    data.batches in one pass, so that a reader that decodes ahead keeps doing so across batches."""
    groups = [g.numpy() for g in groups]
    if not groups:
        return
    order, last = np.concatenate(groups), len(groups[-1])
    for rows, size in ((order[:len(order) - last], len(groups[0])), (order[len(order) - last:], last)):
        for xb, yb in data.batches(size, rows):
            yield torch.from_numpy(xb), torch.from_numpy(_labelled(yb))


def _labelled(y: np.ndarray | None) -> np.ndarray:
    if y is None:
        raise UserError("Training needs labelled rows: the data has no labels.", "Give data with labels.")
    return np.asarray(y, dtype=np.int64)


def _known_rows(data: Rows) -> int | None:
    """len(data), or None where it is not known before a pass (an iterator of batches: len raises TypeError)."""
    try:
        return len(data)
    except TypeError:
        return None


def _steps(n: int | None, batch_size: int) -> int | None:
    """Batches in a pass of n rows, for the progress bar."""
    return None if n is None else math.ceil(n / batch_size)


def _store(buffers: list, k: int, at: int, values, n: int | None, empty) -> None:
    """A batch of per-row `values` into buffers[k] from row `at`: an array allocated once for the n rows (one
    small tensor kept per batch, between the batches' large freed ones, grew the heap), or, where n is not
    known before the pass, one that doubles when full. `empty`: torch.empty or np.empty."""
    need = at + len(values)
    if len(buffers) <= k:
        buffers.append(empty((n if n is not None else max(need, 1024), *values.shape[1:]), dtype=values.dtype))
    elif need > len(buffers[k]):
        grown = empty((max(need, 2 * len(buffers[k])), *values.shape[1:]), dtype=values.dtype)
        grown[:at] = buffers[k][:at]
        buffers[k] = grown
    buffers[k][at:need] = values


@torch.no_grad()
def cache_gate_features(gated, data: Rows, *, batch_size: int = 256, progress: bool = True) -> list[torch.Tensor]:
    """Pooled features at every gate [N, F_k] float32, in data order (F_k floats a row per gate: the
    images are read batch by batch and never kept).

    Runs segments 0..K-1 only: the last segment (often a third of the FLOPs) feeds no gate. The
    features go into arrays allocated once (one small tensor kept per batch, between the batches'
    large freed ones, made the heap grow by about a batch's activations every batch).
    """
    gated.eval()
    n = _known_rows(data)
    pooled: list[torch.Tensor] = []
    at = 0
    for xb, _ in tqdm(data.batches(batch_size), total=_steps(n, batch_size), disable=not progress,
                      desc="caching gate features", unit="batch"):
        carries: tuple[torch.Tensor, ...] = (torch.from_numpy(xb),)
        for k in range(gated.num_gates):
            carries = gated.segments[k](*carries)
            _store(pooled, k, at, gated.heads[k].pool(carries[0]), n, torch.empty)
        at += len(xb)
    return [p[:at] for p in pooled]


def train_gates(gated, train_data: Rows, *, epochs: int = 10, loss: str = "ce", batch_size: int = 256,
                lr: float | None = None, weight_decay: float = 1e-4, seed: int = 0, progress: bool = True,
                feature_batch_size: int = 256, min_steps: int = MIN_GATE_STEPS) -> list[float]:
    """Train every gate head's `classify` on cached pooled features; the backbone stays frozen.

    `loss`: "ce" (cross-entropy) or "hinge" (multi-class hinge, torch.nn.MultiMarginLoss). Adam with a
    cosine schedule over minibatches of the cached features, for `epochs` epochs, or as many more as make
    `min_steps` optimizer steps (small data: the peak rate is then SHORT_LR unless `lr` is given; else
    GATE_LR). Returns each gate's training accuracy.
    """
    if loss not in LOSSES:
        raise UserError(f"Unknown gate loss {loss!r}.", f"Choose one of: {', '.join(LOSSES)}.")
    if epochs < 1:
        raise UserError(f"Gate epochs must be >= 1 (got {epochs}).", "Pass --epochs 1 or more.")
    # Frozen backbone: no gradients, BatchNorm statistics untouched (eval mode).
    gated.eval()
    for p in gated.parameters():
        p.requires_grad_(False)
    pooled = cache_gate_features(gated, train_data, batch_size=feature_batch_size, progress=progress)
    y = torch.from_numpy(_labelled(train_data.labels()))
    loss_fn: nn.Module = nn.CrossEntropyLoss() if loss == "ce" else nn.MultiMarginLoss()
    steps = math.ceil(len(y) / batch_size)
    if epochs * steps < min_steps:  # small data: optimizer steps, not epochs, set the length
        epochs, rate = math.ceil(min_steps / max(steps, 1)), SHORT_LR if lr is None else lr
    else:
        rate = GATE_LR if lr is None else lr
    accuracies = []
    # Heads are tiny (a few thousand weights): threads only add synchronisation, which on a busy
    # machine costs more than the arithmetic.
    with torch_threads(1):
        for k, head in enumerate(gated.heads):
            accuracies.append(_train_head(head, pooled[k], y, f"gate {k} ({gated.exits[k]})", epochs=epochs,
                                          steps=steps, loss_fn=loss_fn, batch_size=batch_size, lr=rate,
                                          weight_decay=weight_decay, seed=seed + k, progress=progress))
    return accuracies


def _train_head(head, feats: torch.Tensor, y: torch.Tensor, desc: str, *, epochs: int, steps: int,
                loss_fn: nn.Module, batch_size: int, lr: float, weight_decay: float, seed: int,
                progress: bool) -> float:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps)
    head.train()
    for _ in tqdm(range(epochs), disable=not progress, desc=desc, unit="epoch"):
        for rows in _batches(len(y), batch_size, rng):
            batch_loss = loss_fn(head.classify(feats[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            schedule.step()
    head.eval()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        return float((head.classify(feats).argmax(1) == y).float().mean())


@torch.no_grad()
def collect_exit_logits(gated, data: Rows, batch_size: int = 256,
                        progress: bool = True) -> tuple[list[np.ndarray], np.ndarray]:
    """Every exit's logits on `data` (K gates, then the backbone's own classifier) and the labels
    (written into arrays allocated once, as cache_gate_features)."""
    gated.eval()
    n = _known_rows(data)
    parts: list[np.ndarray] = []
    at = 0
    for xb, _ in tqdm(data.batches(batch_size), total=_steps(n, batch_size), disable=not progress,
                      desc=f"exit logits ({getattr(data, 'split', '') or 'data'})", unit="batch"):
        for k, logits in enumerate(gated(torch.from_numpy(xb))):
            _store(parts, k, at, logits.float().numpy(), n, np.empty)
        at += len(xb)
    return [p[:at] for p in parts], _labelled(data.labels()).copy()
