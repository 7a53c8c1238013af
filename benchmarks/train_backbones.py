"""Train the benchmark backbones on Fashion-MNIST from scratch (CPU, resumable).

    .venv/bin/python benchmarks/train_backbones.py resnet56      # -> benchmarks/weights/resnet56.pth
    .venv/bin/python benchmarks/train_backbones.py densenet_bc   # -> benchmarks/weights/densenet_bc.pth

The recipe is `dgate_export.compile.train.train_backbone`'s (SGD, Nesterov momentum 0.9, weight decay 5e-4,
one-cycle learning rate peaking at 0.1 after 25% of the steps, batch 128, no augmentation), written
out here as a step loop so that a long CPU run can be interrupted and resumed: every `--save-every`
steps the model, optimizer, schedule and step count go to runs/train/NAME.partial.pt, and a rerun of
the same command picks up from there (same seed -> same batch order). The final state_dict is
written to benchmarks/weights/NAME.pth with a JSON sidecar recording the command, seed, steps, time
and validation accuracy. The training split is Fashion-MNIST "train" (60k minus the seeded validation
split of `--val-size` rows that gating and calibration use, 10 000 by default); the test split is never
touched here. The sidecar records val_size, and gate_networks.py reads it from there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dgate_export.compile.checkpoint import atomic_torch_save
from dgate_export.compile.zoo import build_backbone
from dgate_export.data import load_dataset

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "benchmarks" / "weights"
PARTIAL = ROOT / "runs" / "train"

# The benchmark networks: zoo name -> constructor arguments. Full resolution (stem_stride=1: stages
# at 28, 14 and 7 pixels). stem_stride=2 trains four times faster, but at 14x14 a whole ResNet-56 takes
# 0.85 ms at batch 1 in ONNX Runtime, so the fixed cost of each extra segment run (about 0.1 ms) ate a
# third of the early-exit gain there (benchmarks/README.md, run 3).
NETWORKS = {
    "resnet20": {"stem_stride": 1},
    "resnet32": {"stem_stride": 1},
    "resnet44": {"stem_stride": 1},
    "resnet56": {"stem_stride": 1},
    "resnet110": {"stem_stride": 1},
    "densenet_bc": {"stem_stride": 1},
    "resnet101": {"num_classes": 10, "zero_init_residual": True},
    "densenet201": {"num_classes": 10},
}
# The d-gate paper's own networks, as torchvision builds them (ImageNet stem: 7x7 stride-2 convolution
# and a max-pool), 3-channel input (the gray channel repeated), on Fashion-MNIST resized to 32x32 as
# CIFAR: torchvision's DenseNet-201 cannot take 28x28 (its third transition would pool a 1x1 map).
# ResNet-101 with torchvision's `zero_init_residual=True` (each block's last BatchNorm starts at zero,
# so every block starts as the identity): with the default init it diverged in the first 40 steps at
# both lr 0.1 and 0.025, batch 32 (loss 6-9, benchmarks/results/train_attempts/).
TORCHVISION = {"resnet101": "torchvision/resnet101", "densenet201": "torchvision/densenet201"}
CHANNELS = {"resnet101": 3, "densenet201": 3}
DATA = {"resnet101": "fashion-mnist-32", "densenet201": "fashion-mnist-32"}
FMNIST32 = ROOT / "runs" / "data" / "fashion-mnist-32.npz"
# What the paper's networks are gated and measured on (gate_networks.gate_with_cli, run.py): the whole
# held-out validation split (10 000 rows) for the thresholds and the whole test split for the table;
# 20 000 of the backbone's 50 000 training rows train the gates (each pass of an image through
# ResNet-101 costs about 5 ms of a core; the heads see cached features and stop improving long before).
FMNIST32_GATE = ROOT / "runs" / "data" / "fashion-mnist-32-gate.npz"
GATE_ROWS = {"train": 20000, "val": 10000, "test": 10000}


def gate_rows(n: int, split: str, seed: int) -> np.ndarray:
    """Sorted row indices of `split`'s subset (GATE_ROWS) out of its n rows, seeded by (seed, n)."""
    return np.sort(np.random.default_rng([seed, n]).permutation(n)[:GATE_ROWS[split]])


def arch_name(network: str) -> str:
    """The zoo name of a benchmark network (`torchvision/NAME` for the paper's networks)."""
    return TORCHVISION.get(network, network)


def data_spec(network: str) -> str:
    """`load_dataset` spec of a network's data: Fashion-MNIST as is, or resized to 32x32."""
    if DATA.get(network) == "fashion-mnist-32":
        return "npz:" + str(fashion_mnist_32())
    return "fashion-mnist"


@torch.no_grad()
def to_32(x: np.ndarray) -> np.ndarray:
    """[N, C, 28, 28] -> [N, C, 32, 32], bilinear (half-pixel centres)."""
    out = torch.nn.functional.interpolate(torch.from_numpy(x), size=(32, 32), mode="bilinear", align_corners=False)
    return out.numpy().astype(np.float32)


def fashion_mnist_32(path: Path = FMNIST32) -> Path:
    """Fashion-MNIST resized to 32x32 (normalized as `load_dataset("fashion-mnist")`, then bilinear),
    written once to an npz with x_train/y_train/x_test/y_test: `load_dataset("npz:PATH", split,
    val_size=..., seed=...)` then cuts the same seeded validation rows out of the 60 000 as for the
    28x28 data. One channel; `channels=3` (--repeat-channels) repeats it."""
    if path.is_file():
        return path
    from dgate_export.data import FMNIST_CLASSES, _fashion_mnist

    arrays = {}
    for part in ("train", "test"):
        x, labels = _fashion_mnist(part, None)  # normalized, [N, 1, 28, 28], the file's row order
        arrays[f"x_{part}"], arrays[f"y_{part}"] = to_32(x), labels
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays, class_names=np.array(FMNIST_CLASSES))
    tmp.replace(path)
    return path


def fashion_mnist_32_gate(val_size: int, seed: int, path: Path = FMNIST32_GATE) -> Path:
    """The gating data of the paper's networks (GATE_ROWS), cut from `fashion_mnist_32` with the
    backbone's validation split (val_size, seed), written once to an npz with x_train/x_val/x_test."""
    if path.is_file():
        return path
    full = "npz:" + str(fashion_mnist_32())
    arrays = {}
    for split in ("train", "val", "test"):
        ds = load_dataset(full, split, val_size=val_size, seed=seed)
        rows = gate_rows(len(ds), split, seed)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = ds.x[rows], ds.y[rows]
        names = ds.class_names
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays, class_names=np.array(names))
    tmp.replace(path)
    return path


def _order(n: int, epoch: int, seed: int) -> np.ndarray:
    # One permutation per epoch, derived from (seed, epoch): a resumed run sees the same batches.
    return np.random.default_rng([seed, epoch]).permutation(n)


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    model.eval()
    right = 0
    for start in range(0, len(y), batch_size):
        out = model(torch.from_numpy(x[start:start + batch_size]))
        right += int((out.argmax(1).numpy() == y[start:start + batch_size]).sum())
    return right / len(y)


def sgd_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any,
             x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on (x, y), the schedule advanced; the outputs and the loss."""
    out = model(x)
    loss = loss_fn(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return out, loss


class StepLog:
    """A step loop's progress: loss and accuracy over the steps since the last line, printed every `every`
    steps and at the last, with the minutes taken and left (`started`: perf_counter at step 0)."""

    def __init__(self, total: int, started: float, every: int = 10):
        self.total, self.started, self.every = total, started, every
        self.seen = self.right = 0
        self.loss_sum = 0.0

    def add(self, step: int, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor, lr: float) -> None:
        self.seen += len(y)
        self.right += int((out.argmax(1) == y).sum())
        self.loss_sum += float(loss.detach()) * len(y)
        if step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.started
            print(f"step {step}/{self.total} loss {self.loss_sum / self.seen:.3f} acc {self.right / self.seen:.3f} "
                  f"lr {lr:.4f} {elapsed / 60:.1f} min (eta {elapsed / step * (self.total - step) / 60:.1f} min)",
                  flush=True)
            self.seen = self.right = 0
            self.loss_sum = 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("network", choices=sorted(NETWORKS))
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training split (may be fractional)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-size", type=int, default=10000,
                        help="validation rows held out of training (seeded by --seed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=25, help="steps between resumable checkpoints")
    parser.add_argument("--fresh", action="store_true", help="ignore a partial checkpoint")
    parser.add_argument("--stop-at", default=None, metavar="HH:MM",
                        help="UTC time at which to stop early and write the weights as they are (recorded)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kwargs = NETWORKS[args.network]
    model = build_backbone(arch_name(args.network), kwargs)
    spec = data_spec(args.network)
    train = load_dataset(spec, "train", val_size=args.val_size, seed=args.seed)
    val = load_dataset(spec, "val", val_size=args.val_size, seed=args.seed, channels=CHANNELS.get(args.network))
    channels = CHANNELS.get(args.network, 1)
    # 1-channel rows in memory, repeated per batch (a 3-channel copy of 50 000 32x32 images is 600 MB).
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    n = len(train)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = math.ceil(args.epochs * steps_per_epoch)

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total, pct_start=0.25)
    partial = PARTIAL / f"{args.network}.partial.pt"
    step, spent = 0, 0.0
    if partial.is_file() and not args.fresh:
        state = torch.load(partial, weights_only=True)
        if (state["total"], state["seed"], state.get("val_size", 5000)) != (total, args.seed, args.val_size):
            print(f"{partial} is from another run (total steps {state['total']}, seed {state['seed']}, "
                  f"val size {state.get('val_size', 5000)}); "
                  "pass --fresh to start over.", file=sys.stderr)
            return 2
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, spent = state["step"], state["seconds"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming {args.network} at step {step}/{total}", flush=True)

    loss_fn = nn.CrossEntropyLoss()
    print(f"{args.network} {kwargs}: {n} training samples, {total} steps of {args.batch_size} "
          f"({args.epochs:g} epochs), seed {args.seed}", flush=True)
    model.train()
    started = time.perf_counter() - spent
    log = StepLog(total, started)
    stop_at = None
    if args.stop_at:
        now = datetime.datetime.now(datetime.timezone.utc)
        hh, mm = (int(v) for v in args.stop_at.split(":"))
        stop_at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if stop_at < now:
            stop_at += datetime.timedelta(days=1)
    while step < total:
        if stop_at is not None and datetime.datetime.now(datetime.timezone.utc) >= stop_at:
            print(f"--stop-at {args.stop_at}: stopping at step {step}/{total}", flush=True)
            break
        epoch, i = divmod(step, steps_per_epoch)
        rows = torch.from_numpy(_order(n, epoch, args.seed)[i * args.batch_size:(i + 1) * args.batch_size])
        out, loss = sgd_step(model, loss_fn, optimizer, schedule, x[rows].expand(-1, channels, -1, -1), y[rows])
        step += 1
        log.add(step, out, y[rows], loss, schedule.get_last_lr()[0])
        if step % args.save_every == 0 or step % steps_per_epoch == 0 or step == total:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "schedule": schedule.state_dict(), "step": step, "total": total, "seed": args.seed,
                          "val_size": args.val_size,
                          "seconds": time.perf_counter() - started, "torch_rng": torch.get_rng_state()}, partial)

    seconds = time.perf_counter() - started
    val_acc = accuracy(model, val.x, val.y)
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model.state_dict(), WEIGHTS / f"{args.network}.pth")
    record = {
        "network": args.network, "arch_kwargs": kwargs, "seed": args.seed, "epochs": args.epochs,
        "steps": total, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "steps_done": step, "cut_short": step < total, "data": DATA.get(args.network, "fashion-mnist"),
        "train_samples": n, "val_size": args.val_size, "val_accuracy": val_acc, "train_minutes": round(seconds / 60, 1),
        "threads": args.threads, "torch": torch.__version__,
        "command": "python benchmarks/train_backbones.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (WEIGHTS / f"{args.network}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
