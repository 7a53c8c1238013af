"""Train a torchvision ResNet on the 224x224 Fashion-MNIST JPEG folder (CPU, one thread, resumable).

    .venv/bin/python benchmarks/fmnist224.py write               # the folder, once
    .venv/bin/python benchmarks/train_fmnist224.py --steps 1200   # -> benchmarks/weights/fmnist224_resnet18.pth

A plain torch loop reading the folder with torchvision's ImageFolder, so it shares nothing with
dgate_export's own `folder:` reader but the file order (sorted class folders, sorted file names: the
order both use) and the seeded validation split (`dgate_export.data.split_rows`: the rows `gate` holds
out of train/ for calibration are never trained on here). Images are prepared as `gate --data
folder:... --image-size 224 --normalize imagenet` prepares them (RGB, shorter side resized to 224,
centre crop 224, ImageNet's mean and std); no augmentation.

The subset: `--steps` batches of `--batch-size` rows drawn without replacement from a seeded
permutation of the training rows (train/ minus the validation split), so 1200 steps of 32 train on
38 400 of the 55 000 rows, each seen once. SGD with Nesterov momentum 0.9, weight decay 5e-4, one-cycle
learning rate peaking at `--lr` after 25% of the steps; torchvision's `zero_init_residual=True`.

Every `--save-every` steps the model, optimizer, schedule and step go to runs/train/fmnist224.partial.pt
and a rerun of the same command resumes there. The state_dict `gate` loads goes to
benchmarks/weights/fmnist224_resnet18.pth with a JSON sidecar (command, steps, rows, time, accuracy on
500 validation rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision import transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # train_backbones' step loop helpers

from train_backbones import StepLog, sgd_step

from dgate_export.compile.checkpoint import atomic_torch_save
from dgate_export.data import split_rows

FOLDER = ROOT / "runs" / "data" / "fmnist224"
WEIGHTS = ROOT / "benchmarks" / "weights"
PARTIAL = ROOT / "runs" / "train" / "fmnist224.partial.pt"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--folder", type=Path, default=FOLDER)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--val-size", type=int, default=5000, help="the validation split gate holds out (seed --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--measure", type=int, default=0, help="time this many steps, print, and stop (no files)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these weights (a state_dict written by this script) instead of random ones")
    parser.add_argument("--rows", type=int, default=None,
                        help="the subset: the first ROWS of the seeded order [steps x batch size]; the steps "
                             "pass over it, in a new seeded order each pass")
    parser.add_argument("--pass-seed", type=int, default=0, help="seeds the order of the passes (0: the first run's)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prepare = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
                                  transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images = torchvision.datasets.ImageFolder(str(args.folder / "train"), transform=prepare)
    n = len(images)
    train_rows = split_rows(n, "train", val_size=args.val_size, seed=args.seed)
    val_rows = split_rows(n, "val", val_size=args.val_size, seed=args.seed)
    order = train_rows[np.random.default_rng([args.seed, 224]).permutation(len(train_rows))]
    total = args.steps
    rows = args.rows or total * args.batch_size
    if rows > len(order):
        print(f"--rows {rows} is more than the {len(order)} training rows.", file=sys.stderr)
        return 2
    subset = order[:rows]
    passes = -(-total * args.batch_size // rows)
    if args.pass_seed:  # each pass over the subset in its own seeded order
        order = np.concatenate([subset[np.random.default_rng([args.seed, 224, args.pass_seed, p]).permutation(rows)]
                                for p in range(passes)])
    elif passes > 1:
        print("more steps than the subset holds: give --pass-seed for the passes' orders.", file=sys.stderr)
        return 2

    model = getattr(torchvision.models, args.arch)(num_classes=10, zero_init_residual=True)
    if args.init is not None:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total, pct_start=0.25)
    step, spent = 0, 0.0
    partial = PARTIAL.with_name(f"fmnist224_{args.arch}{'_init' if args.init else ''}.partial.pt")
    if partial.is_file() and not args.fresh and not args.measure:
        state = torch.load(partial, weights_only=True)
        if (state["total"], state["seed"], state["batch_size"]) != (total, args.seed, args.batch_size):
            print(f"{partial} is from another run; pass --fresh to start over.", file=sys.stderr)
            return 2
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, spent = state["step"], state["seconds"]
        print(f"resuming at step {step}/{total}", flush=True)

    def batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [images[int(r)] for r in rows]
        return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])

    loss_fn = nn.CrossEntropyLoss()
    print(f"{args.arch}: {total} steps of {args.batch_size} over {rows} of the {len(train_rows)} training rows "
          f"({passes} pass(es)), one-cycle lr {args.lr}, {args.threads} thread(s)"
          + (f", from {args.init}" if args.init else ""), flush=True)
    model.train()
    started = time.perf_counter() - spent
    log = StepLog(total, started)
    stop = step + args.measure if args.measure else total
    while step < stop:
        t0 = time.perf_counter()
        x, y = batch(order[step * args.batch_size:(step + 1) * args.batch_size])
        t1 = time.perf_counter()
        out, loss = sgd_step(model, loss_fn, optimizer, schedule, x, y)
        step += 1
        if args.measure:
            print(f"step {step}: {time.perf_counter() - t0:.2f} s ({t1 - t0:.2f} s reading)", flush=True)
            continue
        log.add(step, out, y, loss, schedule.get_last_lr()[0])
        if step % args.save_every == 0 or step == total:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "schedule": schedule.state_dict(), "step": step, "total": total, "seed": args.seed,
                               "batch_size": args.batch_size, "seconds": time.perf_counter() - started}, partial)
    if args.measure:
        return 0

    seconds = time.perf_counter() - started
    model.eval()
    check = val_rows[:500]
    with torch.no_grad():
        correct = 0
        for i in range(0, len(check), 50):
            x, y = batch(check[i:i + 50])
            correct += int((model(x).argmax(1) == y).sum())
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    weights = WEIGHTS / f"fmnist224_{args.arch}.pth"
    atomic_torch_save(model.state_dict(), weights)
    previous = json.loads(args.init.with_suffix(".json").read_text()) if args.init else None
    record = {
        "arch": f"torchvision/{args.arch}", "arch_kwargs": {"num_classes": 10}, "steps": total,
        "batch_size": args.batch_size, "rows_trained": rows, "passes": passes, "training_rows": len(train_rows),
        "init": previous,
        "lr": args.lr, "seed": args.seed, "val_size": args.val_size, "threads": args.threads,
        "val_accuracy_500": correct / len(check), "train_minutes": round(seconds / 60, 1), "torch": torch.__version__,
        "command": "python benchmarks/train_fmnist224.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    weights.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
