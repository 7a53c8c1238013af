"""`dgate-export score` in-process on the tiny bundle, the prediction file's guarantees, and the parts of
the Ray integration that need no Ray instance (pool sizing, error recovery, the missing extra). Scoring
on a Ray instance is tested in test_ray.py. The parquet tests need pyarrow and skip without it; the CSV
tests run on the plain install."""

from __future__ import annotations

import csv
import json
import os
import socket
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_bundle import SHAPE, TinyGated, make_tiny_bundle

from dgate_export.cli import main
from dgate_export.compile.parity import probe_thresholds
from dgate_export.errors import UserError
from dgate_export.files import UMASK
from dgate_export.integrations.ray import BundleClassifier, pool_size, require_ray, user_error_in
from dgate_export.runtime import GatedRuntime
from dgate_export.score import PredictionWriter

try:
    import pyarrow.parquet as pq
except ImportError:  # the plain install: CSV only
    pq = None
needs_pyarrow = pytest.mark.skipif(pq is None, reason="pyarrow is not installed (the [parquet] extra)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, *SHAPE), dtype=np.float32)
    thresholds = probe_thresholds(TinyGated(seed=0).all_exits(x))  # every gate splits the rows
    bundle, _ = make_tiny_bundle(tmp / "bundle", thresholds=thresholds, max_batch=16, seed=0)
    y = rng.integers(0, 3, 100).astype(np.int64)
    np.savez(tmp / "labelled.npz", x=x, y=y)
    np.savez(tmp / "images.npz", x=x)
    return bundle, x, y, tmp


def _score(*args):
    return CliRunner().invoke(main, ["score", *map(str, args), "--no-progress"])


def _flat(text: str) -> str:
    """A message as one line (the CLI wraps errors at 100 columns)."""
    return " ".join(text.split())


@needs_pyarrow
def test_in_process_writes_the_runtime_results_in_order(tiny, tmp_path):
    bundle, x, y, data = tiny
    want = GatedRuntime.load(bundle).run(x)
    assert len(set(want.exits)) == 3  # every exit is taken
    out = tmp_path / "p.parquet"
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", out, "--batch-size", "7", "--logits")
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.column_names == ["row", "prediction", "exit", "confidence", "label", "logits"]
    assert np.array_equal(t["row"].to_numpy(), np.arange(100))
    assert np.array_equal(t["prediction"].to_numpy(), want.predictions)
    assert np.array_equal(t["exit"].to_numpy(), want.exits)
    assert np.array_equal(t["confidence"].to_numpy(), want.confidence)
    assert np.array_equal(t["label"].to_numpy(), y)
    assert np.array_equal(np.stack(t["logits"].to_numpy(zero_copy_only=False)), want.logits)
    counts = np.bincount(want.exits, minlength=3)
    assert f"exits: g0 {counts[0] / 100:.1%}, g1 {counts[1] / 100:.1%}, full network {counts[2] / 100:.1%}" in r.output
    assert f"accuracy: {np.mean(want.predictions == y):.2%}" in r.output
    assert "in-process" in r.output and "samples/s" in r.output


@needs_pyarrow
def test_thresholds_and_unlabelled_images(tiny, tmp_path):
    bundle, x, _, data = tiny
    t0 = float(np.median(TinyGated(seed=0).all_exits(x)[0]))
    want = GatedRuntime.load(bundle, thresholds=[t0, 0.0]).run(x)
    assert set(want.exits) == {0, 1}  # gate 1 takes every row gate 0 lets through
    out = tmp_path / "p.parquet"
    r = _score(bundle, "--data", f"npz:{data / 'images.npz'}", "-o", out, "--thresholds", f"{t0!r},0")
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.column_names == ["row", "prediction", "exit", "confidence"]  # no labels, no accuracy
    assert np.array_equal(t["exit"].to_numpy(), want.exits) and "accuracy" not in r.output


@needs_pyarrow
def test_an_existing_output_is_kept_without_force(tiny, tmp_path):
    bundle, _, _, data = tiny
    out = tmp_path / "p.parquet"
    out.write_bytes(b"keep me")
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", out)
    assert r.exit_code == 2 and "--force" in r.output and out.read_bytes() == b"keep me"
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", out, "--force")
    assert r.exit_code == 0 and pq.read_table(out).num_rows == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]


@pytest.mark.parametrize("suffix", [pytest.param(".parquet", marks=needs_pyarrow), ".csv"])
@pytest.mark.parametrize("second", [[4, 5], [3, 4], [5, 6], []], ids=["ok", "duplicate", "lost", "short"])
def test_the_writer_refuses_lost_or_duplicated_rows(tmp_path, second, suffix):
    out = tmp_path / f"p{suffix}"

    def batch(rows):
        n = len(rows)
        return {"row": np.array(rows, np.int64), "prediction": np.zeros(n, np.int64), "exit": np.zeros(n, np.int64),
                "confidence": np.ones(n, np.float32)}

    def write():
        with PredictionWriter(out, 6, 2) as writer:
            writer.write(batch([0, 1, 2, 3]))
            if second:
                writer.write(batch(second))

    if second == [4, 5]:
        write()
        rows = pq.read_table(out)["row"].to_pylist() if suffix == ".parquet" else [int(r["row"]) for r in _read_csv(out)]
        assert rows == list(range(6))
        assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
        return
    with pytest.raises(RuntimeError, match="lost or duplicated|predictions for 6 rows"):
        write()
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_csv_has_the_same_columns_and_exact_values(tiny, tmp_path):
    """-o NAME.csv: the parquet file's columns, one row per input row in order; floats read back to the
    runtime's float32 values bit for bit, logits as a JSON list per row; the file gets a plain open's mode."""
    bundle, x, y, data = tiny
    want = GatedRuntime.load(bundle).run(x)
    out = tmp_path / "p.csv"
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", out, "--batch-size", "7", "--logits")
    assert r.exit_code == 0, r.output
    assert "columns row, prediction, exit, confidence, label, logits" in r.output
    with open(out, newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["row", "prediction", "exit", "confidence", "label", "logits"]
    rows = _read_csv(out)
    assert [int(r["row"]) for r in rows] == list(range(100))
    assert np.array_equal([int(r["prediction"]) for r in rows], want.predictions)
    assert np.array_equal([int(r["exit"]) for r in rows], want.exits) and len(set(want.exits)) == 3
    assert np.array_equal([int(r["label"]) for r in rows], y)
    confidence = np.array([float(r["confidence"]) for r in rows], dtype=np.float32)
    assert np.array_equal(confidence.view(np.int32), want.confidence.view(np.int32))
    logits = np.array([json.loads(r["logits"]) for r in rows], dtype=np.float32)
    assert np.array_equal(logits.view(np.int32), want.logits.view(np.int32))
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~UMASK
    counts = np.bincount(want.exits, minlength=3)
    assert f"exits: g0 {counts[0] / 100:.1%}, g1 {counts[1] / 100:.1%}, full network {counts[2] / 100:.1%}" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_csv_without_labels_or_logits(tiny, tmp_path):
    bundle, x, _, data = tiny
    out = tmp_path / "p.csv"
    r = _score(bundle, "--data", f"npz:{data / 'images.npz'}", "-o", out)
    assert r.exit_code == 0, r.output
    rows = _read_csv(out)
    assert list(rows[0]) == ["row", "prediction", "exit", "confidence"] and len(rows) == 100
    assert np.array_equal([int(r["exit"]) for r in rows], GatedRuntime.load(bundle).run(x).exits)


def test_csv_needs_no_pyarrow_and_parquet_names_its_extra(tiny, tmp_path, monkeypatch):
    bundle, _, _, data = tiny
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # import pyarrow raises ImportError
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", tmp_path / "p.parquet")
    assert r.exit_code == 2, r.output
    assert "pip install 'dgate-export[parquet]'" in _flat(r.output) and "NAME.csv" in r.output
    assert list(tmp_path.iterdir()) == []
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    assert len(_read_csv(tmp_path / "p.csv")) == 100


@pytest.mark.parametrize("name", ["p.txt", "predictions"])
def test_an_output_of_unknown_format_is_refused_before_scoring(tiny, tmp_path, name):
    bundle, _, _, data = tiny
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", tmp_path / name)
    assert r.exit_code == 2 and "names no output format" in _flat(r.output) and "NAME.csv" in r.output
    assert list(tmp_path.iterdir()) == []


def test_an_existing_csv_is_kept_without_force(tiny, tmp_path):
    bundle, _, _, data = tiny
    out = tmp_path / "p.csv"
    out.write_text("keep me")
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", out)
    assert r.exit_code == 2 and "--force" in r.output and out.read_text() == "keep me"
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", out, "--force")
    assert r.exit_code == 0 and len(_read_csv(out)) == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_actors_need_ray(tiny, tmp_path):
    bundle, _, _, data = tiny
    for flag in (["--actors", "2"], ["--max-retries", "1"]):
        r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", tmp_path / "p.parquet", *flag)
        assert r.exit_code == 2 and "--ray" in r.output


def test_split_chooses_the_rows(tiny, tmp_path):
    """--split val scores the validation rows the bundle records (those its thresholds were chosen on),
    train the other training rows, test (the default) the test split; an npz of bare images has no splits."""
    from dgate_export.data import load_dataset
    from dgate_export.manifest import load_manifest, write_manifest

    bundle, _, _, data = tiny
    fm = load_dataset("fashion-mnist", "test")
    x = np.ascontiguousarray(fm.x[:300, :, ::3, ::3][:, :, :8, :8])  # real images, cut to the tiny 1x8x8
    y = fm.y[:300] % 3
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    recorded = tmp_path / "b"
    recorded.mkdir()
    for f in bundle.iterdir():
        (recorded / f.name).write_bytes(f.read_bytes())
    m = load_manifest(recorded)
    m.source = {**(m.source or {}), "data_split": {"data": f"npz:{npz}", "val_size": 30, "seed": 1}}
    write_manifest(recorded, m)
    rows = {}
    for split in ("val", "train", "test"):
        out = tmp_path / f"{split}.parquet"
        r = _score(recorded, "--data", f"npz:{npz}", "--split", split, "-o", out)
        assert r.exit_code == 0, r.output
        labels = pq.read_table(out)["label"].to_numpy()
        want = load_dataset(f"npz:{npz}", split, val_size=30, seed=1)
        assert np.array_equal(labels, want.y)
        rows[split] = len(labels)
        assert (f"({split} split)" in r.output) == (split != "test")
    assert rows == {"val": 30, "train": 170, "test": 100}
    r = _score(bundle, "--data", f"npz:{data / 'images.npz'}", "--split", "val", "-o", tmp_path / "x.parquet")
    assert r.exit_code == 2 and "holds only x" in r.output


def test_a_missing_ray_extra_says_which_extra_to_install(tiny, tmp_path, monkeypatch):
    bundle, _, _, data = tiny
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(UserError, match=r"dgate-export\[ray\]"):
        require_ray()
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", tmp_path / "p.parquet", "--ray")
    assert r.exit_code == 2 and "pip install 'dgate-export[ray]'" in r.output
    assert list(tmp_path.iterdir()) == []


def test_the_classifier_takes_a_batch_dict_and_thresholds(tiny):
    """BundleClassifier is a plain callable class: Ray Data calls it with a dict of numpy arrays."""
    bundle, x, _, _ = tiny
    t0 = float(np.median(TinyGated(seed=0).all_exits(x)[0]))
    want = GatedRuntime.load(bundle, thresholds=[t0, 0.0]).run(x)
    classify = BundleClassifier(bundle, thresholds=[t0, 0.0], logits=True)
    ids = np.arange(100, 200)
    out = classify({"id": ids, "image": x})
    assert sorted(out) == ["confidence", "exit", "id", "logits", "prediction"]
    assert np.array_equal(out["id"], ids)  # other columns pass through
    assert np.array_equal(out["exit"], want.exits) and set(want.exits) == {0, 1}
    assert np.array_equal(out["prediction"], want.predictions)
    assert np.array_equal(out["logits"], want.logits)
    empty = classify({"id": ids[:0], "image": x[:0]})
    assert {k: v.shape for k, v in empty.items()} == {"id": (0,), "prediction": (0,), "exit": (0,),
                                                      "confidence": (0,), "logits": (0, 3)}
    assert sorted(BundleClassifier(bundle)({"image": x})) == ["confidence", "exit", "prediction"]
    with pytest.raises(UserError, match="no column 'image'.*pixels"):
        classify({"pixels": x})


def test_pool_size_follows_the_resources():
    assert pool_size({"CPU": 2}) == 2
    assert pool_size({"CPU": 8, "GPU": 2}, cpus_per_actor=0.5) == 16
    assert pool_size({"CPU": 8, "GPU": 2}, cpus_per_actor=1, gpus_per_actor=1) == 2
    assert pool_size({"CPU": 3}, cpus_per_actor=1.5) == 2
    with pytest.raises(UserError, match="hold no actor"):
        pool_size({"CPU": 1}, cpus_per_actor=2)
    with pytest.raises(UserError, match="hold no actor"):
        pool_size({"CPU": 4}, gpus_per_actor=1)


def test_user_errors_are_recovered_from_ray_tracebacks():
    text = ("ray::MapWorker(MapBatches(BundleClassifier)).submit() (pid=1)\n  File \"x.py\", line 1\n"
            "dgate_export.errors.UserError: The bundle b is damaged. Rebuild it.\n\n"
            "The above exception was the direct cause of the following exception:\n\nUserCodeException: UDF failed")
    found = user_error_in(RuntimeError(text))
    assert isinstance(found, UserError) and str(found) == "The bundle b is damaged. Rebuild it."
    assert user_error_in(RuntimeError("ValueError: something else")) is None
    plain = UserError("as is")
    assert user_error_in(plain) is plain

def test_labels_outside_the_bundles_classes_are_refused(tiny, tmp_path):
    bundle, x, _, _ = tiny
    y = np.zeros(len(x), np.int64)
    y[7] = 3  # the tiny bundle has classes 0..2
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    r = _score(bundle, "--data", f"npz:{tmp_path / 'bad.npz'}", "-o", tmp_path / "p.parquet")
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "outside 0..2" in text and "row 7: label 3" in text, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once the socket is closed


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_ray_address_with_nothing_listening_fails_at_once(tiny, tmp_path, scheme):
    """Ray's own reconnect loop ran past 300 s with no word from dgate-export; now: one paragraph, seconds."""
    pytest.importorskip("ray")
    bundle, _, _, data = tiny
    address = f"{scheme}127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", tmp_path / "p.parquet", "--ray", address)
    assert time.monotonic() - start < 60
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"Nothing answers at {address}" in text and "no Ray cluster listens there" in text, r.output
    assert list(tmp_path.iterdir()) == []


def test_a_ray_address_is_checked_before_ray_is_started():
    from dgate_export.integrations.ray import check_address

    for address in ("local", "auto", "anyscale://project"):
        check_address(address)  # Ray's to resolve
    for address in ("127.0.0.1", "ray://host", "host:port", "host:0", "host:70000"):
        with pytest.raises(UserError, match="is not a cluster address"):
            check_address(address)


@pytest.mark.slow
def test_a_ray_address_where_something_else_listens_fails_in_bounded_time(tiny, tmp_path):
    """Something answers at the address but it is not Ray: Ray tries once (bounded_connect), about 40 s."""
    pytest.importorskip("ray")
    bundle, _, _, data = tiny
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        r = _score(bundle, "--data", f"npz:{data / 'labelled.npz'}", "-o", tmp_path / "p.parquet", "--ray", address)
        seconds = time.monotonic() - start
    assert seconds < 150, seconds
    assert r.exit_code == 2 and "Traceback" not in r.output and "Could not start or reach Ray" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_ray_tries_a_cluster_once_but_starts_a_local_instance_as_it_likes(monkeypatch):
    from dgate_export.integrations.ray import bounded_connect

    key = "RAY_gcs_server_port_wait_time_s"
    monkeypatch.delenv(key, raising=False)
    with bounded_connect("10.0.0.1:6379"):
        assert os.environ[key] == "1"  # one try at a cluster
    assert key not in os.environ
    with bounded_connect("local"):
        assert key not in os.environ  # a new instance's GCS gets Ray's own wait to come up
    monkeypatch.setenv(key, "60")
    with bounded_connect("ray://head:10001"):
        assert os.environ[key] == "60"  # the user's choice stands
