"""Fashion-MNIST as a 224x224 RGB JPEG image folder, gated, built, benched and scored in bounded memory.

    .venv/bin/python benchmarks/fmnist224.py write            # -> runs/data/fmnist224/{train,test}/CLASS/*.jpg
    .venv/bin/python benchmarks/train_fmnist224.py --steps 300  # the backbone used (resumable, one thread, 86 min)
    .venv/bin/python benchmarks/fmnist224.py run               # gate, calibrate, build, bench, score via the CLI

`write` turns each 28x28 grayscale image into a 224x224 RGB JPEG (bicubic up-sampling, the gray
channel repeated, quality 90), in the image-folder convention `folder:` reads: one sub-folder per class,
named `INDEX-NAME` so that the sorted folder names keep Fashion-MNIST's label order ("T-shirt/top" is
written "T-shirt_top"). 60 000 training and 10 000 test images; file names are the row numbers in the
original IDX files.

`run` calls the CLI (cli.py) once per step, each in its own process, and records the peak resident
memory of each (benchmarks/peak_rss.py: the command's own ru_maxrss) beside the size the rows it reads
would have as float32 [N, 3, 224, 224]. The steps: gate (ResNet-18 with `--weights` from
train_fmnist224.py, grid heads after layer1, layer2, layer3, the default promise) on a gating folder of
GATE_ROWS training images the backbone never trained on (symbolic links into train/; its own seeded
validation split of VAL_ROWS rows, never seen by backbone or heads) and GATE_TEST_ROWS test images for
its report; calibrate (the same model again, for --max-drop 0.02); build (ONNX Runtime, max batch 64);
bench at batch 1 and 64 and score, both on all 10 000 test images. Results go to
benchmarks/results/fmnist224.json, each step's output to benchmarks/results/fmnist224_STEP.log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "runs" / "data" / "fmnist224"
SIZE = 224
QUALITY = 90


def class_folder(index: int, name: str) -> str:
    """The sub-folder of class `index`: sorted names keep the label order (10 classes: one digit)."""
    return f"{index}-{name.replace('/', '_')}"


def write(folder: Path = FOLDER, size: int = SIZE) -> dict[str, int]:
    """Write train/ and test/ (skips files already there, so an interrupted write resumes)."""
    from PIL import Image

    from dgate_export.data import DEFAULT_FMNIST_DIR, FMNIST_CLASSES, _read_fashion_mnist

    written = {}
    for part in ("train", "test"):
        images, labels = _read_fashion_mnist(DEFAULT_FMNIST_DIR, part)
        names = [class_folder(i, n) for i, n in enumerate(FMNIST_CLASSES)]
        for name in names:
            (folder / part / name).mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for row, (image, label) in enumerate(zip(images, labels)):
            path = folder / part / names[int(label)] / f"{row:05d}.jpg"
            if path.is_file():
                continue
            big = Image.fromarray(np.asarray(image)).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            tmp = path.with_suffix(".tmp")
            big.save(tmp, format="JPEG", quality=QUALITY)
            os.replace(tmp, path)
            if row % 5000 == 0:
                print(f"{part}: {row}/{len(labels)} ({time.perf_counter() - started:.0f} s)", flush=True)
        written[part] = len(labels)
    return written


WEIGHTS = ROOT / "benchmarks" / "weights" / "fmnist224_resnet18.pth"
RUNS = ROOT / "runs" / "fmnist224"
GATE_FOLDER = ROOT / "runs" / "data" / "fmnist224-gate"
RESULTS = ROOT / "benchmarks" / "results"
GATE_ROWS = 12000
VAL_ROWS = 3000
GATE_TEST_ROWS = 2000  # test images in the gating folder (gate's and calibrate's test figures)
ROW_BYTES = 3 * SIZE * SIZE * 4  # one image as float32 model input


def gate_folder(folder: Path = FOLDER, out: Path = GATE_FOLDER) -> dict:
    """GATE_ROWS training images the backbone never trained on (train_fmnist224.py's sidecar says which
    it did) linked into out/train/CLASS/, and GATE_TEST_ROWS seeded test images into out/test/CLASS/."""
    import torchvision

    from dgate_export.data import split_rows

    record = json.loads(WEIGHTS.with_suffix(".json").read_text())
    files = torchvision.datasets.ImageFolder(str(folder / "train")).samples  # the order both readers use
    n = len(files)
    train_rows = split_rows(n, "train", val_size=record["val_size"], seed=record["seed"])
    order = train_rows[np.random.default_rng([record["seed"], 224]).permutation(len(train_rows))]
    seen = set(order[:record["rows_trained"]].tolist())
    unseen = np.array([i for i in range(n) if i not in seen])
    chosen = np.sort(np.random.default_rng(1).permutation(unseen)[:GATE_ROWS])
    tests = torchvision.datasets.ImageFolder(str(folder / "test")).samples
    test_rows = np.sort(np.random.default_rng(2).permutation(len(tests))[:GATE_TEST_ROWS])
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        for part, picked, listing in (("train", chosen, files), ("test", test_rows, tests)):
            for i in picked:
                src = Path(listing[i][0])
                dst = tmp / part / src.parent.name / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(src)
        tmp.rename(out)
    return {"train_rows": len(chosen), "from": f"{n} training images minus the {len(seen)} the backbone "
            "trained on", "train_seed": 1, "test_rows": len(test_rows), "test_seed": 2}


def measured(name: str, args: list[str], rows: int) -> dict:
    """Run `dgate-export ARGS` as a child process; its peak resident memory, time and output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    record = RUNS / "peak.json"
    # peak_rss.py: the command's own peak (a child forked from this process, which imported torch, would
    # report at least this process's size)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peak_rss.py"), str(record), sys.executable,
           str(ROOT / "cli.py"), *args]
    print(f"== {name}: dgate-export {' '.join(args)}", flush=True)
    with open(RESULTS / f"fmnist224_{name}.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=False)
    peak = json.loads(record.read_text())
    code = peak["exit_status"]
    entry = {"command": "dgate-export " + " ".join(args), "exit_status": code, "seconds": peak["seconds"],
             "peak_rss_mb": peak["peak_rss_mb"], "rows_read": rows,
             "rows_as_float32_mb": round(rows * ROW_BYTES / 2**20, 1)}
    print(json.dumps(entry), flush=True)
    if code != 0:
        raise SystemExit(f"{name} failed: see benchmarks/results/fmnist224_{name}.log")
    return entry


def run(steps: list[str]) -> dict:
    RUNS.mkdir(parents=True, exist_ok=True)
    results_path = RESULTS / "fmnist224.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"steps": {}}
    results["gate_rows"] = gate_folder()
    results["backbone"] = json.loads(WEIGHTS.with_suffix(".json").read_text())
    model, bundle = RUNS / "model.pt", RUNS / "bundle"
    test_rows = 10000
    gate_test = GATE_TEST_ROWS
    commands = {
        "gate": (["gate", "--arch", "torchvision/resnet18", "--arch-kwargs", '{"num_classes": 10}', "--weights",
                  str(WEIGHTS), "--exits", "layer1,layer2,layer3", "--head", "grid", "--data", f"folder:{GATE_FOLDER}",
                  "--image-size", str(SIZE), "--normalize", "imagenet", "--val-size", str(VAL_ROWS), "--no-progress",
                  "-o", str(model)], GATE_ROWS + gate_test),
        "calibrate": (["calibrate", str(model), "--data", f"folder:{GATE_FOLDER}", "--max-drop", "0.02",
                       "--no-progress", "-o", str(RUNS / "model_drop2.pt")], VAL_ROWS + gate_test),
        "build": (["build", str(model), "-o", str(bundle), "--max-batch", "64", "--force"], 0),
        "bench": (["bench", "--engine", str(bundle), "--data", f"folder:{FOLDER}", "--batch-sizes", "1,64",
                   "--json", str(RESULTS / "fmnist224_bench.json")], test_rows),
        "score": (["score", str(bundle), "--data", f"folder:{FOLDER}", "-o", str(RUNS / "predictions.parquet"),
                   "--force", "--no-progress"], test_rows),
    }
    for name in steps:
        args, rows = commands[name]
        results["steps"][name] = measured(name, args, rows)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def decode(rows: int = 2000, threads: tuple[int, ...] = (0, 1, 2, 4)) -> dict:
    """Images per second `folder:` reads (decode, prepare, normalize) at batch 64 with 0 (in the calling
    thread), 1, 2 and 4 decoding threads, on the first `rows` test images; each setting twice, interleaved."""
    from dgate_export.data import open_rows
    from dgate_export.images import ImagePrep

    data = open_rows(f"folder:{FOLDER}", "test", image=ImagePrep((SIZE, SIZE), SIZE), normalization="imagenet")
    data = data.select(np.arange(rows))
    best: dict[int, float] = {}
    for _ in range(2):
        for n in threads:
            data.threads = n
            started = time.perf_counter()
            for _batch in data.batches(64):
                pass
            best[n] = max(best.get(n, 0.0), rows / (time.perf_counter() - started))
    return {"rows": rows, "batch": 64, "images_per_s": {str(k): round(v) for k, v in best.items()},
            "load_average": os.getloadavg()}


def table(results_path: Path = RESULTS / "fmnist224.json") -> str:
    """The README's table: per step, rows read, their size as float32, peak RSS, time."""
    results = json.loads(results_path.read_text())
    lines = ["| step | rows read | as float32 | peak RSS | time |", "|---|---|---|---|---|"]
    for name, step in results["steps"].items():
        rows = f"{step['rows_read']:,}" if step["rows_read"] else "none (export)"
        f32 = f"{step['rows_as_float32_mb'] / 1024:.1f} GB" if step["rows_read"] else "-"
        lines.append(f"| {name} | {rows} | {f32} | {step['peak_rss_mb'] / 1024:.2f} GB | "
                     f"{step['seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the JPEG folder")
    w.add_argument("--folder", type=Path, default=FOLDER)
    r = sub.add_parser("run", help="gate, calibrate, build, bench and score through the CLI, measuring memory")
    r.add_argument("--steps", default="gate,calibrate,build,bench,score")
    sub.add_parser("decode", help="images/s of folder: reading with 0, 1, 2 and 4 decoding threads")
    sub.add_parser("table", help="print the README's table from benchmarks/results/fmnist224.json")
    args = parser.parse_args(argv)
    if args.command == "table":
        print(table())
        return 0
    if args.command == "decode":
        print(json.dumps(decode()))
        return 0
    if args.command == "run":
        run([s.strip() for s in args.steps.split(",") if s.strip()])
        return 0
    if args.command == "write":
        started = time.perf_counter()
        counts = write(args.folder)
        size = sum(f.stat().st_size for f in args.folder.rglob("*.jpg"))
        print(json.dumps({"images": counts, "bytes": size, "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
