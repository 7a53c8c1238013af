"""`dgate-export profile` and its use by `calibrate --cost`, on the tiny bundle: hand-edited profiles are
refused with one paragraph (a schema: types, ranges, finite, positive), nonsense options at parse time,
and `calibrate --engine --cost` chooses by the profile's measured times, not by FLOPs."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_bundle import SHAPE, make_tiny_bundle

from dgate_export import profile as profile_mod
from dgate_export.calibrate import Target, calibrate_scores, exits_of
from dgate_export.cli import main
from dgate_export.errors import UserError
from dgate_export.manifest import load_manifest, verify_bundle
from dgate_export.recalibrate import exit_scores
from dgate_export.runtime import GatedRuntime


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    result.text = " ".join(result.output.split())
    return result


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The tiny bundle, its labelled rows (one npz), and a real profile of it at batch 1."""
    tmp = tmp_path_factory.mktemp("profile")
    bundle, _ = make_tiny_bundle(tmp / "bundle", thresholds=(0.6, 0.5), max_batch=8)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((900, *SHAPE), dtype=np.float32)
    y = np.asarray(GatedRuntime.load(bundle).run(x, thresholds=[2.0, 2.0]).predictions)  # the full net is right ...
    flip = rng.random(900) < 0.2
    y[flip] = rng.integers(0, 3, int(flip.sum()))  # ... on about 87% of the rows
    data = tmp / "rows.npz"
    np.savez(data, x=x, y=y.astype(np.int64))
    out = tmp / "profile.json"
    result = run("profile", bundle, "--min-seconds", 0.02, "-o", out)
    assert result.exit_code == 0, result.output
    return bundle, data, json.loads(out.read_text())


def _set(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


# (what is wrong, the field path, the value, what the message names)
MALFORMED = [
    ("batches not a list", ("batches",), "all of them", "batches"),
    ("batches empty", ("batches",), [], "batches"),
    ("a batch not an object", ("batches", 0), 1, "batches[0]"),
    ("batch_size a string", ("batches", 0, "batch_size"), "eight", "batches[0].batch_size"),
    ("batch_size zero", ("batches", 0, "batch_size"), 0, "batches[0].batch_size"),
    ("batch_size a float", ("batches", 0, "batch_size"), 1.5, "batches[0].batch_size"),
    ("batch_size true", ("batches", 0, "batch_size"), True, "batches[0].batch_size"),
    ("times a string", ("batches", 0, "exit_time_costs"), "fast", "batches[0].exit_time_costs"),
    ("a time a string", ("batches", 0, "exit_time_costs"), [0.5, "0.7", 1.0], "batches[0].exit_time_costs"),
    ("a time negative", ("batches", 0, "exit_time_costs"), [0.5, -0.7, 1.0], "batches[0].exit_time_costs"),
    ("a time zero", ("batches", 0, "exit_time_costs"), [0.0, 0.7, 1.0], "batches[0].exit_time_costs"),
    ("a time not finite", ("batches", 0, "exit_time_costs"), [0.5, math.inf, 1.0], "batches[0].exit_time_costs"),
    ("too few times", ("batches", 0, "exit_time_costs"), [0.5, 1.0], "batches[0].exit_time_costs"),
    ("bundle a list", ("bundle",), ["x"], "bundle"),
    ("fingerprint a number", ("bundle", "fingerprint"), 7, "bundle.fingerprint"),
    ("exits a string", ("bundle", "exits"), "g0,g1", "bundle.exits"),
    ("segment FLOPs negative", ("bundle", "segment_flops"), [-1, 2, 3], "bundle.segment_flops"),
    ("providers a string", ("bundle", "providers"), "cpu", "bundle.providers"),
    ("min_seconds negative", ("min_seconds",), -1, "min_seconds"),
]


@pytest.mark.parametrize("what, path, value, named", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_profile_is_one_clear_refusal(measured, tmp_path, what, path, value, named):
    bundle, data, good = measured
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_set(good, path, value)))  # inf is written as Infinity, which json reads back
    with pytest.raises(UserError, match="malformed") as info:
        profile_mod.load_costs(bad, batch_size=None, manifest=load_manifest(bundle))
    assert named in str(info.value)
    before = (bundle / "manifest.json").read_bytes()
    result = run("calibrate", "--engine", bundle, "--data", f"npz:{data}", "--val-size", 600, "--cost", bad)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "malformed" in result.text and named in result.text, result.output
    assert (bundle / "manifest.json").read_bytes() == before


def test_profile_options_are_checked_at_parse_time(measured, tmp_path):
    bundle, _, _ = measured
    for seconds in ("-1", "0", "nan"):
        result = run("profile", bundle, "--min-seconds", seconds, "-o", tmp_path / "p.json")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "Invalid value for '--min-seconds'" in result.output, result.output  # click's, before any work
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="min_seconds"):
        profile_mod.measure(bundle, [1], min_seconds=-1)


def test_a_profile_records_its_minimum_time(measured):
    _, _, good = measured
    assert good["min_seconds"] == 0.02 and profile_mod.profile_problems(good) == []


def test_calibrate_engine_chooses_by_the_measured_times(measured, tmp_path):
    """Times that reorder the exits (gate 1 cheaper than gate 0: a made-up profile, to tell time from FLOPs)
    change the choice; the bundle's thresholds are calibrate's choice on those times."""
    bundle, data, good = measured
    bundle = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    times = [0.9, 0.3, 1.0]
    profile = tmp_path / "times.json"
    profile.write_text(json.dumps(_set(good, ("batches", 0, "exit_time_costs"), times)))
    target = ["--max-drop", "0.1", "--guarantee", "none"]
    result = run("calibrate", "--engine", bundle, "--data", f"npz:{data}", "--val-size", 600, *target,
                 "--cost", profile)
    assert result.exit_code == 0, result.output
    chosen = verify_bundle(bundle)
    # what calibrate chooses on the runtime's own scores of the recorded validation rows, by time and by FLOPs
    from dgate_export.data import load_dataset

    val = load_dataset(f"npz:{data}", "val", val_size=600)
    rt = GatedRuntime.load(bundle)
    conf, correct = exit_scores(rt, val.x, val.y)
    rt.close()
    goal = Target(max_drop=0.1, guarantee="none")
    by_time = calibrate_scores(conf, correct, confidence=chosen.confidence, costs=times, baseline_flops=1.0,
                               target=goal, num_classes=chosen.num_classes)
    flops = chosen.exit_costs()
    by_flops = calibrate_scores(conf, correct, confidence=chosen.confidence, costs=flops,
                                baseline_flops=chosen.baseline.flops, target=goal, num_classes=chosen.num_classes)
    time_exits, flops_exits = exits_of(conf, by_time.thresholds), exits_of(conf, by_flops.thresholds)
    assert np.bincount(time_exits, minlength=3)[1] > np.bincount(flops_exits, minlength=3)[1]  # the times matter
    assert chosen.thresholds == by_time.thresholds
    assert chosen.calibration["cost"]["exit_costs"] == times
    expected = float(np.dot(np.bincount(time_exits, minlength=3), times) / len(val))
    assert chosen.calibration["cost"]["expected"] == pytest.approx(expected)
    assert "measured time at batch 1" in result.text
