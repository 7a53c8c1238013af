"""Time a training step of a paper network before choosing its schedule (issue 18's "measure first").

    .venv/bin/python benchmarks/step_time.py resnet101 --batch-size 64 --threads 1

Random 3-channel 32x32 inputs (the step's cost does not depend on the values), SGD with momentum, two
warm-up steps, then the mean of four; prints seconds per step and the minutes an epoch of the 50 000
training images would take at that rate.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from train_backbones import NETWORKS, arch_name  # type: ignore[import-not-found]

from dgate_export.compile.zoo import build_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("network", choices=["resnet101", "densenet201"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_backbone(arch_name(args.network), NETWORKS[args.network]).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    for i in range(2 + args.steps):
        if i == 2:
            started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step = (time.perf_counter() - started) / args.steps
    print(f"{args.network} batch {args.batch_size}, {args.threads} thread(s): {step:.3f} s/step, "
          f"{step / args.batch_size * 50000 / 60:.1f} min per epoch of 50 000 images")


if __name__ == "__main__":
    main()
