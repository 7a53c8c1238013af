"""Offline scoring on Ray Data (dgate_export.integrations.ray, `dgate-export score --ray`).

On a local Ray instance with 2 CPUs, started and stopped once for the module: Fashion-MNIST's test split
scored by a demo-sized bundle (the demo's ResNet-20 with a stride-2 stem, random weights, thresholds that
split every gate) gives exactly GatedRuntime.run's predictions and exits, row by row, with 1 and 2
actors; an actor killed mid-job loses and duplicates no row; a damaged bundle fails the job with the
runtime's message and writes nothing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from export_models import gated

from dgate_export.cli import main
from dgate_export.compile import checkpoint
from dgate_export.compile.build import build_bundle
from dgate_export.compile.parity import probe_thresholds
from dgate_export.data import load_dataset
from dgate_export.errors import UserError
from dgate_export.runtime import GatedRuntime

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'dgate-export[ray]') is not installed")
pq = pytest.importorskip("pyarrow.parquet")

from dgate_export.compile.build import BuildOptions
from dgate_export.integrations.ray import (
    BundleClassifier,
    dataset_from_arrays,
    died_on,
    score_dataset,
    start_batch_log,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("fashion-mnist", "test")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, fmnist):
    """The demo's architecture (ResNet-20, stride-2 stem, 3 gates), random weights, thresholds at which
    every gate lets some of the probed rows leave and some go on."""
    torch.manual_seed(0)
    model = gated("resnet20", input_shape=(1, 28, 28), num_classes=10, kwargs={"stem_stride": 2})
    with torch.no_grad():
        exits = model(torch.from_numpy(fmnist.x[:512]))
    model.thresholds = probe_thresholds([torch.softmax(lg, 1).amax(1).numpy() for lg in exits[:-1]])
    tmp = tmp_path_factory.mktemp("ray")
    return build_bundle(checkpoint.save(model, tmp / "model.pt"), tmp / "bundle",
                        BuildOptions(exporter="torchscript"), progress=None)


@pytest.fixture(scope="module")
def reference(bundle, fmnist):
    runtime = GatedRuntime.load(bundle)
    result = runtime.run(fmnist.x)
    assert (np.bincount(result.exits, minlength=4) > 100).all(), result.exit_counts  # every exit is taken
    return result


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_one_actor_gives_the_runtime_results_in_input_order(local_ray, bundle, fmnist, reference):
    out = _collect(score_dataset(dataset_from_arrays(fmnist.x, fmnist.y), bundle, actors=1, batch_size=500))
    assert sorted(out) == ["confidence", "exit", "label", "prediction", "row"]
    assert np.array_equal(out["row"], np.arange(len(fmnist.x)))
    assert np.array_equal(out["prediction"], reference.predictions)
    assert np.array_equal(out["exit"], reference.exits)
    assert np.array_equal(out["confidence"], reference.confidence)
    assert np.array_equal(out["label"], fmnist.y)


def test_cli_with_two_actors_writes_the_runtime_results_in_input_order(local_ray, bundle, fmnist, reference,
                                                                       tmp_path):
    out = tmp_path / "predictions.parquet"
    result = CliRunner().invoke(main, ["score", str(bundle), "--data", "fashion-mnist", "-o", str(out), "--ray",
                                       "--actors", "2", "--logits", "--no-progress"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names == ["row", "prediction", "exit", "confidence", "label", "logits"]
    assert np.array_equal(table["row"].to_numpy(), np.arange(len(fmnist.x)))
    assert np.array_equal(table["prediction"].to_numpy(), reference.predictions)
    assert np.array_equal(table["exit"].to_numpy(), reference.exits)
    logits = np.stack(table["logits"].to_numpy(zero_copy_only=False))
    assert np.array_equal(logits, reference.logits)
    assert "2 actors" in result.output
    fractions = np.bincount(reference.exits, minlength=4) / len(fmnist.x)
    assert f"layer1 {fractions[0]:.1%}" in result.output and f"full network {fractions[3]:.1%}" in result.output
    accuracy = np.mean(reference.predictions == fmnist.y)
    assert f"accuracy: {accuracy:.2%}" in result.output
    assert "samples/s" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.parquet"]  # no temporary file left


class _SlowClassifier(BundleClassifier):
    """The real classifier, slowed down so that the job lasts long enough to kill an actor mid-job; each
    instance leaves a file named after its process id in `pid_dir`."""

    pid_dir = ""

    def __init__(self, bundle, **kwargs):
        super().__init__(bundle, **kwargs)
        Path(self.pid_dir, str(os.getpid())).touch()

    def __call__(self, batch):
        time.sleep(0.2)
        return super().__call__(batch)


def test_an_actor_killed_mid_job_loses_and_duplicates_no_row(local_ray, bundle, fmnist, reference, tmp_path):
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    classifier = type("Slow", (_SlowClassifier,), {"pid_dir": str(tmp_path)})
    n = 4000
    out = score_dataset(dataset_from_arrays(fmnist.x[:n]), bundle, actors=2, batch_size=250, classifier=classifier)
    rows, predictions, exits, killed, received_at_kill = [], [], [], None, 0
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(batch["row"])
        predictions.append(batch["prediction"])
        exits.append(batch["exit"])
        if killed is None:
            killed = int(min(tmp_path.iterdir(), key=lambda p: p.stat().st_mtime).name)
            os.kill(killed, signal.SIGKILL)
            received_at_kill = sum(map(len, rows))
    assert killed is not None and received_at_kill < n  # the kill came mid-job
    assert len(list(tmp_path.iterdir())) >= 2  # the killed actor, and at least one that finished its work
    assert np.array_equal(np.concatenate(rows), np.arange(n))
    assert np.array_equal(np.concatenate(predictions), reference.predictions[:n])
    assert np.array_equal(np.concatenate(exits), reference.exits[:n])


@pytest.mark.parametrize("on_ray", [True, False], ids=["ray", "in-process"])
def test_a_damaged_bundle_fails_the_job_with_the_runtime_message(local_ray, bundle, tmp_path, on_ray):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    with open(bad / "segment1.onnx", "r+b") as f:  # one byte changed: the sha256 no longer matches
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "predictions.parquet"
    args = ["score", str(bad), "--data", "fashion-mnist", "--limit", "1000", "-o", str(out), "--no-progress"]
    result = CliRunner().invoke(main, args + (["--ray", "--actors", "1"] if on_ray else []))
    assert result.exit_code == 2, result.output
    with pytest.raises(UserError) as runtime_error:
        GatedRuntime.load(bad)
    assert "segment1.onnx (mismatch)" in str(runtime_error.value)
    assert " ".join(result.output.split()) == f"error: {runtime_error.value}"  # that paragraph and nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # nothing written, no temporary file


class _PoisonClassifier(BundleClassifier):
    """The real classifier, whose process dies (as the kernel's OOM killer would end it) while it runs
    the batch holding row 600, however often it is restarted."""

    def _classify(self, batch):
        if 600 in batch["row"]:
            time.sleep(0.3)
            os._exit(1)
        return super()._classify(batch)


def test_actors_that_keep_dying_fail_the_job_naming_the_batch(local_ray, bundle, fmnist):
    """Bounded retries: a batch that kills every actor running it fails the job after --max-retries, and the
    failure names that batch (Ray Data alone retries it forever)."""
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    batch_log = start_batch_log()
    out = score_dataset(dataset_from_arrays(fmnist.x[:2000]), bundle, actors=2, batch_size=250,
                        classifier=_PoisonClassifier, max_retries=1, batch_log=batch_log)
    import threading

    failure: list[BaseException] = []

    def run() -> None:
        try:
            _collect(out)
        except BaseException as err:  # noqa: BLE001 (what the job raised is the test's subject)
            failure.append(err)

    job = threading.Thread(target=run, daemon=True)  # without a bound, Ray retries forever: give up waiting
    job.start()
    job.join(180)
    assert not job.is_alive(), "the job was still retrying after 180 s"
    assert failure and isinstance(failure[0], ray.exceptions.RayActorError), failure
    err = died_on(failure[0], batch_log, 1, 0)
    assert err is not None
    import re

    found = re.search(r"the batch of rows (\d+)\.\.(\d+) was started (\d+) times and never finished", err.message)
    assert found, err.message
    first, last, tries = map(int, found.groups())
    assert first <= 600 <= last and last - first + 1 == 250 and tries >= 2  # the poisoned batch, retried
    assert "gave up after 1 retries (--max-retries)" in err.message and "--batch-size" in err.hint
    assert died_on(ValueError("other"), batch_log, 1, 0) is None


def test_score_on_ray_keeps_ray_out_of_the_terminal(bundle, tmp_path):
    """A successful `score --ray`, run as a user runs it (a process of its own, a real stdout and stderr):
    only our lines, none of Ray's (its core worker's or its workers' messages), and no log left behind."""
    import shutil
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "p.parquet"
    temp = Path(tempfile.mkdtemp(prefix="dgr", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "PYTHONPATH": str(root), "TMPDIR": str(temp)}
    try:
        proc = subprocess.run([sys.executable, str(root / "cli.py"), "score", str(bundle), "--data", "fashion-mnist",
                               "--split", "val", "--limit", "1500", "-o", str(out), "--ray", "--actors", "1",
                               "--no-progress"], capture_output=True, text=True, timeout=300, env=env, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stderr == "", proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("scored 1500 rows of fashion-mnist (val split) with"), lines
        assert lines[-1].startswith("wrote") and len(lines) == 5, lines  # scored, exits, accuracy, speed, wrote
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]
        assert list(temp.glob("dgate-score-ray-*.log")) == []  # a success keeps no log of Ray's messages
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_memory_mapped_rows_are_read_by_rays_tasks(local_ray, bundle, fmnist, reference, tmp_path):
    """An npz's x is read where Ray's tasks run (the driver pickles its file and offset, not the rows):
    the runtime's results on the same rows, in order."""
    import pickle

    from dgate_export.data import open_rows

    np.savez(tmp_path / "x.npz", x=fmnist.x)  # unlabelled
    rows = open_rows(f"npz:{tmp_path / 'x.npz'}", "test", labelled=None)
    assert len(pickle.dumps(rows)) < 10_000  # what each task receives
    out = tmp_path / "p.parquet"
    result = CliRunner().invoke(main, ["score", str(bundle), "--data", f"npz:{tmp_path / 'x.npz'}", "-o",
                                       str(out), "--ray", "--actors", "1", "--batch-size", "500", "--no-progress"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names == ["row", "prediction", "exit", "confidence"]  # unlabelled
    assert np.array_equal(table["row"].to_numpy(), np.arange(len(fmnist.x)))
    assert np.array_equal(table["prediction"].to_numpy(), reference.predictions)
    assert np.array_equal(table["exit"].to_numpy(), reference.exits)
