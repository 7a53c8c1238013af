"""Memory does not grow with the rows: gate, bench and score on an image folder whose rows would take
several times a memory cap as float32, each command in its own process, its peak resident memory read
by benchmarks/peak_rss.py (a small wrapper's RUSAGE_CHILDREN ru_maxrss: the command's own).

The same commands run on a small folder (SMALL rows) and a large one (LARGE rows, real Fashion-MNIST
pictures as 48x48 RGB JPEGs); the large run may use at most CAP_MB more than the small one, while its
rows as float32 [N, 3, 48, 48] take more than FACTOR times CAP_MB. A command that held the images (or
their float32 copy) would grow by that much. bench holds the first rows it times (`--timing-mb`): 8 MB
here, which both sets fill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dgate_export.data import DEFAULT_FMNIST_DIR, _read_fashion_mnist

Image = pytest.importorskip("PIL.Image")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (DEFAULT_FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]
ROOT = Path(__file__).resolve().parent.parent
SIZE = 48
SMALL, LARGE = (1200, 600), (7200, 3600)  # (train rows, test rows): the small set still fills every batch
# what the large run may use beyond the small one: gate grew 51 MB once (allocator noise of its backbone
# training, a fresh clone on 2 workers) where it usually grows less than 40; holding the rows would add 285
CAP_MB = 60
FACTOR = 4  # the large rows as float32 are more than FACTOR x CAP_MB


def write_folder(root: Path, rows: tuple[int, int]) -> float:
    """train/ and test/ trees of 48x48 RGB JPEGs; returns the rows' size as float32 in MB."""
    for part, n in zip(("train", "test"), rows):
        images, labels = _read_fashion_mnist(DEFAULT_FMNIST_DIR, part)
        for i in range(n):
            folder = root / part / f"class{int(labels[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(images[i])).resize((SIZE, SIZE)).convert("RGB").save(folder / f"{i:05d}.jpg")
    return sum(rows) * 3 * SIZE * SIZE * 4 / 2**20


def peak_mb(tmp: Path, *args: object, torch: bool = False) -> float:
    """Run `dgate-export ARGS` (cli.py) in a child process; its peak resident memory in MB. `torch`: import
    the test architecture (and torch) first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    record = tmp / "peak.json"
    first = ["--import", "tiny_arch"] if torch else []
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peak_rss.py"), str(record), sys.executable,
                          str(ROOT / "cli.py"), *first, *map(str, args)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=900, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return float(json.loads(record.read_text())["peak_rss_mb"])


def steps(data: Path, out: Path) -> dict[str, float]:
    model, bundle = out / "model.pt", out / "bundle"
    return {
        "gate": peak_mb(out, "gate", "--arch", "test_tiny_cnn", "--arch-kwargs", '{"in_channels": 3}', "--data",
                        f"folder:{data}", "--image-size", SIZE, "--val-size", 300, "--backbone-epochs", 1,
                        "--epochs", 2, "--guarantee", "none", "--no-progress", "-o", model, torch=True),
        "build": peak_mb(out, "build", model, "-o", bundle, "--exporter", "torchscript", "--max-batch", 64,
                         torch=True),
        "bench": peak_mb(out, "bench", "--engine", bundle, "--data", f"folder:{data}", "--batch-sizes", "1,64",
                         "--min-seconds", 0.2, "--min-iterations", 2, "--warmup-ms", 10, "--timing-mb", 8),
        "score": peak_mb(out, "score", bundle, "--data", f"folder:{data}", "-o", out / "p.parquet", "--no-progress"),
    }


def test_gate_bench_and_score_memory_does_not_grow_with_the_rows(tmp_path):
    pytest.importorskip("pyarrow")
    write_folder(tmp_path / "small", SMALL)
    large_mb = write_folder(tmp_path / "large", LARGE)
    assert large_mb > FACTOR * CAP_MB  # the data is several times the cap
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small = steps(tmp_path / "small", tmp_path / "a")
    large = steps(tmp_path / "large", tmp_path / "b")
    grew = {k: large[k] - small[k] for k in small if k != "build"}  # build reads no data (fp32)
    print(f"peak MB small {small}, large {large}; large rows as float32 {large_mb:.0f} MB")
    assert all(g < CAP_MB for g in grew.values()), (
        f"peak MB small {small}, large {large}: grew {grew}; the large rows are {large_mb:.0f} MB as float32")
