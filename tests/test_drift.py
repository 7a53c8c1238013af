"""The drift signal (drift.py): the chi-square tail, the two-sample test and its false alarms, where a
bundle's reference comes from, the counts read from metrics and from score's outputs, `dgate-export drift`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_bundle import make_tiny_bundle

from dgate_export.cli import main
from dgate_export.drift import (
    chi2_sf,
    exit_mix_test,
    reference_of,
    reference_record,
    scored_exit_counts,
    served_exit_counts,
)
from dgate_export.errors import UserError
from dgate_export.manifest import load_manifest, write_manifest

# chi-square critical values (df -> (x at p = 0.05, x at p = 0.001)), from the standard tables
CRITICAL = {1: (3.841459, 10.827566), 2: (5.991465, 13.815511), 3: (7.814728, 16.266236), 4: (9.487729, 18.466827),
            5: (11.070498, 20.515006)}


def test_chi2_tail_matches_the_tables():
    for df, (x05, x001) in CRITICAL.items():
        assert chi2_sf(x05, df) == pytest.approx(0.05, rel=1e-5)
        assert chi2_sf(x001, df) == pytest.approx(0.001, rel=1e-4)
        assert chi2_sf(0.0, df) == 1.0
        assert chi2_sf(1e4, df) == 0.0
    xs = np.linspace(0.1, 30, 50)
    assert all(np.diff([chi2_sf(x, 3) for x in xs]) < 0)  # a tail: decreasing in x
    with pytest.raises(ValueError):
        chi2_sf(1.0, 0)


def test_same_mix_passes_a_shifted_mix_alarms():
    ref = np.array([3000, 1000, 600, 400])
    same = exit_mix_test(ref, np.array([1490, 510, 300, 200]))
    assert not same.alarm and same.p_value > 0.1 and same.df == 3
    shifted = exit_mix_test(ref, np.array([1200, 550, 400, 350]))  # fewer early exits
    assert shifted.alarm and shifted.p_value < 1e-6 and "DRIFT" in shifted.sentence()


def test_sparse_exits_are_merged_and_degenerate_mixes_pass():
    test = exit_mix_test(np.array([900, 95, 4, 1]), np.array([50, 5, 0, 0]))
    assert test.groups[-1] == [1, 2, 3] or [2, 3] in test.groups  # the rare last exits were pooled
    assert test.df == len(test.groups) - 1
    everyone_early = exit_mix_test(np.array([100, 0, 0]), np.array([7, 0, 0]))
    assert everyone_early.p_value == 1.0 and not everyone_early.alarm
    with pytest.raises(UserError, match="No samples"):
        exit_mix_test(np.array([10, 10]), np.array([0, 0]))
    with pytest.raises(UserError, match="3 exits observed"):
        exit_mix_test(np.array([10, 10]), np.array([1, 1, 1]))
    with pytest.raises(UserError, match="alpha"):
        exit_mix_test(np.array([10, 10]), np.array([1, 1]), alpha=1.5)


def test_false_alarms_stay_at_alpha_when_windows_outgrow_the_reference():
    """Both samples drawn from one exit mix: a two-sample test alarms at about alpha, even with a window
    20x the reference (a test against the reference's fractions as if exact would alarm most of the time)."""
    rng = np.random.default_rng(0)
    p = np.array([0.55, 0.25, 0.12, 0.08])
    alarms = [exit_mix_test(rng.multinomial(1000, p), rng.multinomial(20000, p), alpha=0.05).alarm
              for _ in range(2000)]
    assert np.mean(alarms) == pytest.approx(0.05, abs=0.015)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path, _ = make_tiny_bundle(tmp_path_factory.mktemp("drift") / "tiny", thresholds=(0.5, 0.6))
    return path


def _with(bundle, tmp_path, **fields):
    """A copy of the bundle's manifest with `fields` replaced (the reference is in the manifest only)."""
    out = tmp_path / "b"
    out.mkdir(parents=True)
    for f in bundle.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    m = load_manifest(out)
    for key, value in fields.items():
        setattr(m, key, value)
    write_manifest(out, m)
    return out


def test_the_reference_is_the_bundles_record_for_its_thresholds(bundle, tmp_path):
    with pytest.raises(UserError, match="records no calibration exit mix") as info:
        reference_of(load_manifest(bundle))
    assert "drift BUNDLE --record" in info.value.hint
    record = reference_record([0.5, 0.3, 0.2], 1000, [0.5, 0.6], on="validation rows", by="test")
    ref = reference_of(load_manifest(_with(bundle, tmp_path / "a", exit_reference=record)))
    assert ref.counts.tolist() == [500, 300, 200] and ref.rows == 1000 and ref.where == "validation rows; test"
    stale = {**record, "thresholds": [0.4, 0.6]}  # thresholds changed since (a hand-edited manifest, say)
    with pytest.raises(UserError, match="for other thresholds"):
        reference_of(load_manifest(_with(bundle, tmp_path / "b", exit_reference=stale)))
    with pytest.raises(UserError, match="exit_reference must hold 3 exit_fractions"):
        _with(bundle, tmp_path / "c", exit_reference={**record, "exit_fractions": [0.5, 0.5]})


def test_record_writes_the_bundles_own_exit_mix_on_its_validation_rows(bundle, tmp_path):
    """`drift --record DATA`: the bundle run on the validation split it records, the counts into the manifest;
    the artifacts stay as they were (the bundle still verifies)."""
    from dgate_export.data import load_dataset
    from dgate_export.manifest import verify_bundle
    from dgate_export.runtime import GatedRuntime

    rng = np.random.default_rng(3)
    npz = tmp_path / "d.npz"
    np.savez(npz, x=rng.standard_normal((400, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 3, 400))
    m = load_manifest(bundle)
    b = _with(bundle, tmp_path / "r", source={**(m.source or {}), "data_split": {"data": f"npz:{npz}", "val_size": 120,
                                                                                  "seed": 2}})
    res = CliRunner().invoke(main, ["drift", str(b), "--record", f"npz:{npz}"])
    assert res.exit_code == 0, res.output
    val = load_dataset(f"npz:{npz}", "val", val_size=120, seed=2)
    want = np.bincount(GatedRuntime.load(b).run(val.x).exits, minlength=3)
    ref = reference_of(verify_bundle(b))
    assert ref.counts.tolist() == want.tolist() and ref.rows == 120 and "drift --record" in ref.where
    res = CliRunner().invoke(main, ["drift", str(b), "--record", f"npz:{npz}", "--scores", "x.csv"])
    assert res.exit_code == 2 and "--record writes the reference" in res.output


METRICS = """# HELP dgate_exit_samples_total Samples answered
# TYPE dgate_exit_samples_total counter
dgate_exit_samples_total{exit="0",model="tiny",thresholds="bundle"} 120
dgate_exit_samples_total{exit="1",model="tiny",thresholds="bundle"} 30
dgate_exit_samples_total{exit="2",model="tiny",thresholds="bundle"} 6
dgate_exit_samples_total{exit="0",model="tiny",thresholds="request"} 999
dgate_exit_samples_total{exit="0",model="other",thresholds="bundle"} 999
nv_inference_count{model="tiny",version="1"} 77
"""


def test_counts_from_metrics_and_from_score_outputs(tmp_path):
    assert served_exit_counts(METRICS, "tiny", 3).tolist() == [120, 30, 6]  # the bundle's thresholds only
    with pytest.raises(UserError, match="no dgate_exit_samples_total of the gate model 'nope'"):
        served_exit_counts(METRICS, "nope", 3)
    exits = np.array([0, 0, 1, 2, 0, 1])
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "prediction", "exit", "confidence"])
        w.writerows([i, 0, int(e), 0.5] for i, e in enumerate(exits))
    assert scored_exit_counts(path, 3).tolist() == [3, 2, 1]
    with pytest.raises(UserError, match="outside 0..1"):
        scored_exit_counts(path, 2)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"row": np.arange(6), "exit": exits}), tmp_path / "p.parquet")
    assert scored_exit_counts(tmp_path / "p.parquet", 3).tolist() == [3, 2, 1]
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a parquet file"):
        scored_exit_counts(tmp_path / "bad.parquet", 3)


def test_drift_command(bundle, tmp_path):
    b = _with(bundle, tmp_path, exit_reference=reference_record([0.5, 0.3, 0.2], 2000, [0.5, 0.6], on="val", by="t"))
    runner = CliRunner()

    def scored(counts, name):
        exits = np.repeat(np.arange(3), counts)
        path = tmp_path / name
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "exit"])
            w.writerows([i, int(e)] for i, e in enumerate(exits))
        return path

    same = runner.invoke(main, ["drift", str(b), "--scores", str(scored([505, 295, 200], "same.csv"))])
    assert same.exit_code == 0, same.output
    assert "no drift" in same.output and "2000 calibration rows" in same.output and "50.00%" in same.output
    moved = runner.invoke(main, ["drift", str(b), "--scores", str(scored([300, 300, 400], "moved.csv"))])
    assert moved.exit_code == 1 and "DRIFT" in moved.output, moved.output
    for args, message in ((["--scores", "x.csv", "--metrics", "u"], "exactly one"), ([], "exactly one"),
                          (["--scores", "x.csv", "--window", "3"], "apply to --metrics only"),
                          (["--metrics", "127.0.0.1:9"], "Could not read metrics")):
        res = runner.invoke(main, ["drift", str(b), *args])
        assert res.exit_code == 2 and message in res.output, res.output
    res = runner.invoke(main, ["drift", str(bundle), "--scores", str(tmp_path / "same.csv")])
    assert res.exit_code == 2 and "records no calibration exit mix" in " ".join(res.output.split())
    assert json.loads((b / "manifest.json").read_text())["exit_reference"]["rows"] == 2000


def test_serve_tests_windows_of_what_was_served_since_the_last_read():
    """serve's DriftWatch: the counters it reads are cumulative; each window holds what was served since
    the window began, also across a server restart, and each complete window is tested once."""
    from dgate_export.drift import Reference
    from dgate_export.serving.serve import DriftWatch

    lines: list[str] = []
    watch = DriftWatch(Reference(np.array([600, 300, 100]), 1000, "t"), "m", window=100, alpha=0.001,
                       echo=lines.append)
    watch.update(np.array([30, 15, 5]))
    assert watch.windows == 0 and watch.counts.tolist() == [30, 15, 5]
    watch.update(np.array([60, 30, 10]))  # 50 more: the window is full, the calibration's mix
    assert watch.windows == 1 and watch.test.observed.tolist() == [60, 30, 10] and not watch.test.alarm
    assert watch.counts.sum() == 0 and lines == []
    watch.restarted()  # a new server counts from zero
    watch.update(np.array([0, 10, 90]))
    assert watch.windows == 2 and watch.test.observed.tolist() == [0, 10, 90] and watch.alarms == 1
    assert lines and "window 2: DRIFT" in lines[-1] and "calibration 0.600 0.300 0.100" in lines[-1]
    watch.update(np.array([3, 1, 1]))  # counters went back without a restart seen: counted from zero
    assert watch.counts.tolist() == [3, 1, 1]
    text = "\n".join(watch.lines())
    assert 'dgate_drift_alarm{model="m"} 1' in text and 'dgate_drift_windows_total{model="m"} 2' in text
    assert 'dgate_drift_window_samples{model="m"} 5' in text
    assert 'dgate_drift_reference_exit_fraction{model="m",exit="0"} 0.6' in text
