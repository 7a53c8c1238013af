"""Gate your own PyTorch model from Python: attach, train, calibrate, save, build, run, bench.

    python examples/python_api.py [-o runs/python_api]     # 2.5-6.5 min here at load 6-8 (91-129 s of CPU)

The walk-through of docs/python-api.md, runnable: a small CNN defined here (in no registry) is trained
in plain PyTorch on Fashion-MNIST (Debian's dataset-fashion-mnist), then gets two exit heads of its own
class, trained from a DataLoader with the backbone frozen, calibrated on a torch Dataset, saved, built
into a bundle straight from memory, run with the torch-free runtime and benchmarked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dgate_export.compile import (
    BenchOptions,
    BuildOptions,
    Target,
    attach_gates,
    bench_bundle,
    build_bundle,
    calibrate_gates,
    save_model,
    train_gates,
)
from dgate_export.data import load_dataset
from dgate_export.runtime import GatedRuntime


class SmallNet(nn.Module):
    """Your classifier: any nn.Module whose forward torch.fx can trace, [N, C, H, W] -> [N, classes]."""

    def __init__(self, classes: int = 10):
        super().__init__()
        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.block1 = block(1, 16, 2)    # 14x14
        self.block2 = block(16, 32, 2)   # 7x7
        self.block3 = nn.Sequential(block(32, 64, 1), block(64, 64, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.block3(self.block2(self.block1(x))))


class ExitHead(nn.Module):
    """Your exit head (any module: the exit's output -> [N, classes]). Its `pool` / `classify` split lets
    gate training cache the pooled vectors (16 floats a row here) instead of the exit's whole output."""

    def __init__(self, channels: int, classes: int = 10):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels * 4, 64), nn.ReLU(), nn.Linear(64, classes))
        self.cells = nn.AdaptiveAvgPool2d(2)

    def pool(self, x):
        return self.cells(x).flatten(1)

    def classify(self, pooled):
        return self.fc(pooled)

    def forward(self, x):
        return self.classify(self.pool(x))


def tensors(ds) -> TensorDataset:
    return TensorDataset(torch.from_numpy(ds.x), torch.from_numpy(ds.y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default="runs/python_api", help="folder for model.pt and the bundle")
    parser.add_argument("--train-rows", type=int, default=30000, help="rows that train the backbone")
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)

    # Your data as torch datasets (normalized float tensors, int labels). Here Fashion-MNIST, with a
    # validation split the gates never train on: the thresholds are chosen there.
    train = load_dataset("fashion-mnist", "train", val_size=5000)
    val = load_dataset("fashion-mnist", "val", val_size=5000)
    test = load_dataset("fashion-mnist", "test")

    # Your model, trained in your own code (one quick epoch here).
    net = SmallNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for x, y in DataLoader(tensors(train.subset(args.train_rows)), batch_size=128, shuffle=True):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()

    # 1. Gates after block1 and block2, with your own heads. The class names and the normalization are
    #    recorded in the bundle (the runtime then also takes uint8 raw pixels).
    gated = attach_gates(net, ["block1", "block2"], head=[ExitHead(16), ExitHead(32)], input_shape=(1, 28, 28),
                         class_names=train.class_names, normalization=train.normalization)
    # 2. Train them, backbone frozen: one pass over the DataLoader caches the pooled features.
    trained = train_gates(gated, DataLoader(tensors(train), batch_size=256, shuffle=True), epochs=5, progress=False)
    print(f"gate training accuracy {[round(a, 3) for a in trained.accuracy]} "
          f"(feature cache: {trained.cache_bytes_per_row} bytes a row)")
    # 3. Thresholds on the validation rows: a drop of at most 1 point on new data, with probability >= 90%.
    done = calibrate_gates(gated, tensors(val), test=tensors(test), target=Target(max_drop=0.01), progress=False)
    assert done.test is not None
    print(done.calibration.promise())
    print(f"test: {done.test.accuracy:.2%} gated vs {done.test.accuracy_ungated:.2%} un-gated, "
          f"{done.test.flops_reduction:.1%} fewer FLOPs; thresholds {[round(t, 4) for t in done.thresholds]}")
    # 4. Save (optional: loading model.pt later needs SmallNet and ExitHead registered, see the docs).
    saved = save_model(gated, out / "model.pt", calibration=done)
    print(f"wrote {saved.path}" + (f" (to load it: register {', '.join(saved.unregistered)})" if saved.unregistered
                                   else ""))
    # 5. Build straight from memory: a self-contained bundle (no registry, no torch needed to run it).
    bundle = build_bundle(gated, out / "bundle", BuildOptions(force=True), progress=None)
    rt = GatedRuntime.load(bundle)
    raw = (np.asarray(test.x[:8]) * test.normalization["std"][0] + test.normalization["mean"][0]) * 255
    res = rt.run(raw.round().clip(0, 255).astype(np.uint8))  # raw pixels: normalized by the runtime
    print(f"runtime on 8 test images: predictions {res.predictions.tolist()}, exits {res.exits.tolist()}")
    # 6. Bench against the un-gated baseline on the same backend.
    report = bench_bundle(bundle, tensors(test.subset(2000)), options=BenchOptions(batch_sizes=(1, 256),
                          min_seconds=1.0), progress=False)
    for entry in report["speed"]:
        print(f"batch {entry['batch_size']}: measured speed-up {entry['speedup']:.2f}x "
              f"(ideal {entry['ideal_speedup']:.2f}x)")


if __name__ == "__main__":
    main()
