"""`folder:` data through the CLI: gate, calibrate, build, bench, score and examples/classify.py prepare
the images the same way (recorded in model.pt and the manifest), and a bad folder writes nothing.

The images are real Fashion-MNIST pictures written as 36x32 RGB JPEGs (non-square, so resize and centre
crop matter), gated with `--image-size 28 --resize 30 --normalize imagenet` on the tiny test CNN.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_arch import NAME

from dgate_export.cli import main
from dgate_export.compile import checkpoint
from dgate_export.data import DEFAULT_FMNIST_DIR, FMNIST_CLASSES, _read_fashion_mnist, open_rows
from dgate_export.images import ImagePrep, normalization, prepare_image, scan_folder
from dgate_export.manifest import FORMAT_IMAGES, load_manifest
from dgate_export.runtime import GatedRuntime

Image = pytest.importorskip("PIL.Image")
pq = pytest.importorskip("pyarrow.parquet")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]
ROOT = Path(__file__).resolve().parent.parent
PREP = ImagePrep((28, 28), 30, "RGB")
KWARGS = json.dumps({"in_channels": 3})


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def text(result) -> str:
    return " ".join(result.output.split())


def write_images(root: Path, part: str, rows: range) -> None:
    images, labels = _read_fashion_mnist(DEFAULT_FMNIST_DIR, part)
    for i in rows:
        folder = root / f"{int(labels[i])}-{FMNIST_CLASSES[int(labels[i])].replace('/', '_')}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[i])).resize((36, 32), Image.Resampling.BICUBIC).convert("RGB").save(
            folder / f"{i:05d}.jpg", quality=90)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    data = tmp_path_factory.mktemp("folder") / "fmnist"
    write_images(data / "train", "train", range(900))
    write_images(data / "test", "test", range(300))
    return data


@pytest.fixture(scope="module")
def flow(images, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    data = images
    model = tmp / "model.pt"
    r = run("gate", "--arch", NAME, "--arch-kwargs", KWARGS, "--data", f"folder:{data}", "--image-size", 28,
            "--resize", 30, "--normalize", "imagenet", "--val-size", 300, "--backbone-epochs", 2, "--epochs", 3,
            "--guarantee", "none", "--max-drop", 0.05, "--no-progress", "-o", model)
    assert r.exit_code == 0, r.output
    bundle = tmp / "bundle"
    r = run("build", model, "-o", bundle, "--exporter", "torchscript", "--max-batch", 64)
    assert r.exit_code == 0, r.output
    return data, model, bundle, tmp


def test_the_preparation_is_recorded_in_the_model_and_the_bundle(flow):
    data, model_path, bundle, _ = flow
    model = checkpoint.load(model_path)
    assert model.image == PREP.to_dict() and model.input_shape == (3, 28, 28)
    assert model.normalization == normalization("imagenet", 3)
    assert model.class_names == sorted(p.name for p in (data / "train").iterdir())
    manifest = load_manifest(bundle)
    assert manifest.format == FORMAT_IMAGES and manifest.input.image == PREP
    assert manifest.input.normalization == model.normalization
    assert json.loads((bundle / "manifest.json").read_text())["input"]["image"]["resize"] == 30


def test_score_bench_and_classify_see_the_same_pixels(flow, tmp_path):
    data, _, bundle, _ = flow
    out = tmp_path / "p.parquet"
    r = run("score", bundle, "--data", f"folder:{data}", "-o", out, "--batch-size", 50, "--no-progress")
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    listing = scan_folder(data / "test")
    pixels = np.stack([prepare_image(listing.path(i), PREP) for i in range(len(listing))])
    want = GatedRuntime.load(bundle).run(pixels)  # uint8: the runtime normalizes with the manifest
    assert np.array_equal(t["prediction"].to_numpy(), want.predictions)
    assert np.array_equal(t["exit"].to_numpy(), want.exits)
    assert np.array_equal(t["label"].to_numpy(), listing.labels)
    r = run("bench", "--engine", bundle, "--data", f"folder:{data}", "--batch-sizes", "1,16", "--min-seconds", 0.1,
            "--min-iterations", 2, "--warmup-ms", 10, "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["accuracy"]["gated"] == pytest.approx(float(np.mean(want.predictions == listing.labels)))
    assert report["exits"]["counts"] == np.bincount(want.exits, minlength=len(want.exit_counts)).tolist()
    example = subprocess.run([sys.executable, str(ROOT / "examples" / "classify.py"), str(bundle),
                              str(data / "test"), "--show", "300"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300, check=False)
    assert example.returncode == 0, example.stderr
    names = load_manifest(bundle).class_names
    for i in (0, 7, 299):
        rel = listing.path(i).relative_to(data / "test")
        assert f"{rel}: {names[want.predictions[i]]}  exit {want.exits[i]}" in example.stdout
    assert f"accuracy: {np.mean(want.predictions == listing.labels):.4f}" in example.stdout


def test_calibrate_reads_the_folder_as_recorded(flow, tmp_path):
    data, model, _, _ = flow
    r = run("calibrate", model, "--data", f"folder:{data}", "--budget", 0.6, "--no-progress", "-o",
            tmp_path / "b.pt")
    assert r.exit_code == 0, r.output
    copy = tmp_path / "bundle"
    r = run("build", model, "-o", copy, "--exporter", "torchscript", "--max-batch", 64)
    assert r.exit_code == 0, r.output
    r = run("calibrate", "--engine", copy, "--data", f"folder:{data}", "--budget", 0.6)
    assert r.exit_code == 0, r.output
    assert load_manifest(copy).calibration["data"]["rows"] == 300
    # the validation rows are the model's recorded split of train/ (row indices into its files)
    val = open_rows(f"folder:{data}", "val", val_size=300, image=PREP)
    assert len(val) == 300 and len(set(val.index.tolist())) == 300


@pytest.mark.parametrize("what", ["corrupt", "not an image", "empty class"])
def test_a_bad_folder_writes_nothing(tmp_path, what):
    bad = tmp_path / "bad"
    write_images(bad / "train", "train", range(120))
    write_images(bad / "test", "test", range(40))
    if what == "corrupt":
        name = sorted((bad / "train").iterdir())[3] / "99999.jpg"
        name.write_bytes(b"\xff\xd8\xff\xe0 broken")
    elif what == "not an image":
        name = bad / "test" / min(p.name for p in (bad / "test").iterdir()) / "README.md"
        name.write_text("notes")
    else:
        name = bad / "train" / "zz-empty"
        name.mkdir()
    out = tmp_path / "out" / "model.pt"
    out.parent.mkdir()
    r = run("gate", "--arch", NAME, "--arch-kwargs", KWARGS, "--data", f"folder:{bad}", "--image-size", 28,
            "--val-size", 40, "--backbone-epochs", 1, "--epochs", 1, "--guarantee", "none", "--no-progress",
            "-o", out)
    assert r.exit_code == 2, r.output
    assert str(name) in text(r) and "Traceback" not in r.output
    assert list(out.parent.iterdir()) == []  # nothing written, no temporary file left


def test_folder_needs_an_image_size(images, tmp_path):
    data = images
    r = run("gate", "--arch", NAME, "--arch-kwargs", KWARGS, "--data", f"folder:{data}", "--no-progress",
            "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "--image-size" in text(r)
    r = run("gate", "--arch", NAME, "--data", "fashion-mnist", "--image-size", 28, "--no-progress",
            "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "folder: data only" in text(r)


def test_drift_record_and_score_split_read_the_recorded_validation_images(flow, tmp_path):
    """drift --record and score --split val read the bundle's recorded validation split of train/ as images
    prepared as the manifest records: the exit mix recorded is the runtime's on those files."""
    data, _, bundle, _ = flow
    val = open_rows(f"folder:{data}", "val", val_size=300, image=PREP)
    listing = scan_folder(data / "train")
    pixels = np.stack([prepare_image(listing.path(int(i)), PREP) for i in val.index])
    # thresholds that spread the rows over the exits (the calibrated ones send them all out at the first),
    # so that other rows or other pixels would give another mix
    rt = GatedRuntime.load(bundle)
    spread = next([t] * rt.num_gates for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
                  if len(np.unique(rt.run(pixels, thresholds=[t] * rt.num_gates).exits)) >= 3)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for seg, t in zip(manifest["segments"], spread):
        seg["gate"]["threshold"] = t
    manifest.pop("exit_reference", None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    r = run("drift", copy, "--record", f"folder:{data}")
    assert r.exit_code == 0, r.output
    exits = rt.run(pixels, thresholds=spread).exits
    reference = load_manifest(copy).exit_reference
    assert reference["rows"] == 300 and reference["by"] == "drift --record"
    want = np.bincount(exits, minlength=len(reference["exit_fractions"])) / 300
    assert reference["exit_fractions"] == pytest.approx(want.tolist())
    out = tmp_path / "val.parquet"
    r = run("score", copy, "--data", f"folder:{data}", "--split", "val", "-o", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert np.array_equal(pq.read_table(out)["exit"].to_numpy(), exits)


def test_no_output_inside_the_image_folder_read(flow):
    """An output written among the images would be read as data next time (and refused as a non-image
    file): score refuses it before reading anything, and writes nothing."""
    data, _, bundle, _ = flow
    out = data / "test" / "predictions.csv"
    r = run("score", bundle, "--data", f"folder:{data}", "-o", out, "--no-progress")
    assert r.exit_code == 2 and "which this command reads" in text(r), r.output
    assert not out.exists()
