"""examples/classify.py runs where torch cannot be imported.

A sys.meta_path finder that refuses torch, torchvision, onnx and onnxscript stands in for a machine
without them: it is exact (any import of those fails, however indirect) and costs nothing, where a
fresh venv holding only numpy + onnxruntime would need a network or a wheel cache and tens of seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_bundle import make_tiny_bundle

from dgate_export.images import ImagePrep, prepare_image
from dgate_export.runtime import GatedRuntime

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "classify.py"
NORM = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}

_BLOCKED_RUN = """
import runpy, sys
BLOCKED = {"torch", "torchvision", "onnx", "onnxscript"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, Block())
for m in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
    del sys.modules[m]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKED_RUN, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("ex") / "tiny", normalization=NORM)[0]


def test_the_blocker_blocks(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import torch\n")
    out = _run_without_torch(str(script))
    assert out.returncode != 0 and "torch is blocked" in out.stderr


def test_classify_npz_without_torch(bundle, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)  # raw grayscale pixels, no channel axis
    y = rng.integers(0, 3, 30)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = _run_without_torch(str(EXAMPLE), str(bundle), str(tmp_path / "d.npz"), "--thresholds", "0.45", "0.45",
                             "--show", "3")
    assert out.returncode == 0, out.stderr
    want = GatedRuntime.load(bundle).run(x[:, None], thresholds=[0.45, 0.45])
    names = ["a", "b", "c"]
    lines = out.stdout.splitlines()
    for i in range(3):
        assert lines[i].startswith(f"#{i}: {names[want.predictions[i]]}  exit {want.exits[i]}  ")
        assert lines[i].endswith(f"(true: {names[y[i]]})")
    counts = want.exit_counts
    assert f"exits: gate 0: {counts[0]}, gate 1: {counts[1]}, final: {counts[2]}" in out.stdout
    assert f"accuracy: {np.mean(want.predictions == y):.4f}" in out.stdout


def test_classify_png_folder_without_torch(bundle, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(tmp_path / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8), mode="L").save(tmp_path / "z_big.png")
    out = _run_without_torch(str(EXAMPLE), str(bundle), str(tmp_path))
    assert out.returncode == 0, out.stderr
    # prepared as `score` prepares images for a bundle gated on arrays: the shorter side to the model's
    # size, then the centre crop (12x10 -> 9x8 -> 8x8)
    big = prepare_image(tmp_path / "z_big.png", ImagePrep.for_input((1, 8, 8)))
    np.testing.assert_array_equal(big[0], np.asarray(Image.open(tmp_path / "z_big.png").resize((9, 8),
                                  Image.Resampling.BILINEAR))[:, 0:8])
    want = GatedRuntime.load(bundle).run(np.concatenate([pixels[:, None], big[None]]))
    for i in range(3):
        assert f"img{i}.png: {['a', 'b', 'c'][want.predictions[i]]}  exit {want.exits[i]}" in out.stdout
    assert f"z_big.png: {['a', 'b', 'c'][want.predictions[3]]}  exit {want.exits[3]}" in out.stdout
    assert "4 samples in" in out.stdout


def test_classify_reports_user_errors(bundle, tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    out = _run_without_torch(str(EXAMPLE), str(bundle), str(tmp_path / "bad.npz"))
    assert out.returncode == 2
    assert out.stderr.startswith("error: Input has 3 channels")
    out = _run_without_torch(str(EXAMPLE), str(tmp_path / "nothing"), str(tmp_path / "bad.npz"))
    assert out.returncode == 2 and "not a bundle directory" in out.stderr
