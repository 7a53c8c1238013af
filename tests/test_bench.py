"""`dgate-export bench`: the report's figures agree with each other, on real data and on random input."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dgate_export.bench import LATENCY_KEYS, SCHEMA, check_report
from dgate_export.calibrate import Target
from dgate_export.cli import main
from dgate_export.compile import checkpoint, zoo
from dgate_export.compile.build import BuildOptions, build_bundle
from dgate_export.compile.model import GatedModel
from dgate_export.errors import UserError

FAST = ["--warmup-ms", "5", "--min-iterations", "3", "--min-seconds", "0.05"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A small zoo ResNet on Fashion-MNIST's input shape, thresholds that exit some samples per gate."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("bench")
    kwargs = {"num_classes": 10, "width": 4}
    model = GatedModel(zoo.build_backbone("resnet20", kwargs), ["layer1", "layer2.0"],
                       arch={"name": "resnet20", "kwargs": kwargs}, num_classes=10, input_shape=(1, 28, 28),
                       normalization={"scale": 1 / 255, "mean": [0.2860406], "std": [0.3530242]})
    from dgate_export.data import load_dataset
    x = torch.from_numpy(load_dataset("fashion-mnist", "val").x[:256])
    with torch.no_grad():
        from dgate_export.compile.heads import confidence_torch
        model.thresholds = [float(confidence_torch("max-softmax", logits).median()) for logits in model(x)[:-1]]
    path = checkpoint.save(model, tmp / "model.pt")
    return build_bundle(path, tmp / "bundle", BuildOptions(max_batch=64), progress=lambda *a, **k: None)


def bench(args):
    result = CliRunner().invoke(main, ["bench", *args], catch_exceptions=False)
    result.text = " ".join(result.output.split())  # the CLI wraps its error paragraph
    return result


def test_report_on_fashion_mnist(bundle, tmp_path):
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    result = bench(["--engine", str(bundle), "--data", "fashion-mnist", "--limit", "300", "--batch-sizes", "1,64",
                    *FAST, "--sweep", "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    check_report(report)
    assert report["schema"] == SCHEMA and report["data"]["samples"] == 300
    assert set(report) >= {"command", "machine", "bundle", "versions", "data", "thresholds", "exits", "flops",
                           "accuracy", "speed", "sweep"}
    assert "onnxruntime" in report["versions"] and report["bundle"]["backend"] == "onnxruntime"
    assert [s["batch_size"] for s in report["speed"]] == [1, 64]
    for s in report["speed"]:
        assert s["iterations"] >= 3 and s["speedup"] > 0
        assert set(s["gated"]["latency_ms"]) == set(LATENCY_KEYS)
        assert abs(s["gated"]["throughput"] - s["batch_size"] / s["gated"]["latency_ms"]["mean"] * 1e3) < 1e-6
    counts = report["exits"]["counts"]
    assert sum(counts) == 300 and len(counts) == 3
    # thresholds at the median confidence: both gates and the final exit are used
    assert all(c > 0 for c in counts)
    acc = report["accuracy"]
    assert acc["per_exit"][0] is not None and len(acc["per_exit"]) == 3
    # the sweep runs from "everyone leaves at gate 0" to "nobody leaves early"
    first, last = report["sweep"][0], report["sweep"][-1]
    assert first["exits"]["fractions"][0] == 1.0 and last["exits"]["fractions"][-1] == 1.0
    assert abs(last["accuracy"]["gated"] - acc["baseline"]) < 1e-9
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed-up" in result.output and "FLOPs reduction" in result.output


def test_random_input_speed_only(bundle, tmp_path):
    out = tmp_path / "r.json"
    result = bench(["--engine", str(bundle), "--random", "40", "--batch-sizes", "8", *FAST, "--json", str(out),
                    "--thresholds", "0.5,0.5"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    check_report(report)
    assert report["accuracy"] is None and report["data"]["labelled"] is False
    assert report["thresholds"] == [0.5, 0.5]
    assert report["bundle"]["providers"] == ["CPUExecutionProvider"]


def test_exit_times_give_a_time_based_ideal(bundle, tmp_path):
    out = tmp_path / "r.json"
    r = bench(["--engine", str(bundle), "--data", "fashion-mnist", "--limit", "64", "--batch-sizes", "8", *FAST,
               "--exit-times", "--json", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    check_report(report)  # time ideal = 1 / sum(fraction_k * time cost_k); runtime efficiency = measured / it
    (s,) = report["speed"]
    costs = s["exit_time_costs"]
    assert len(costs) == 3
    # No ordering of the costs is asserted: they are timings (3 short rounds), and on a loaded machine
    # leaving at gate 0 measured slower than running all three sessions. Speed belongs in benchmarks/.
    assert "runtime efficiency" in r.text


def test_providers_are_passed_to_onnx_runtime(bundle, tmp_path):
    out = tmp_path / "r.json"
    r = bench(["--engine", str(bundle), "--random", "8", "--batch-sizes", "8", *FAST, "--providers", "cpu",
               "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["bundle"]["providers"] == ["CPUExecutionProvider"]
    # a provider this onnxruntime lacks is an error naming what is installed, never a CPU fallback
    r = bench(["--engine", str(bundle), "--random", "8", "--providers", "NoSuchExecutionProvider"])
    assert r.exit_code == 2 and "NoSuchExecutionProvider is not available" in r.text
    assert "CPUExecutionProvider" in r.text
    r = bench(["--engine", str(bundle), "--random", "8", "--providers", "cpu", "--backend", "tensorrt"])
    assert r.exit_code == 2 and "--providers applies to ONNX Runtime only" in r.text


def test_errors_are_clear(bundle, tmp_path):
    r = bench(["--engine", str(tmp_path), "--random", "4"])
    assert r.exit_code == 2 and "not a dgate-export bundle" in r.text
    r = bench(["--engine", str(bundle), "--random", "4", "--batch-sizes", "1,65"])
    assert r.exit_code == 2 and "max-batch" in r.text
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((4, 1, 32, 32), np.float32), y=np.zeros(4, np.int64))
    r = bench(["--engine", str(bundle), "--data", f"npz:{npz}"])
    assert r.exit_code == 2 and "(1, 28, 28)" in r.text
    r = bench(["--engine", str(bundle)])
    assert r.exit_code == 2 and "exactly one of" in r.text
    np.savez(npz, x=np.zeros((4, 1, 28, 28), np.float32), y=np.array([0, 9, 99, 3], np.int64))
    r = bench(["--engine", str(bundle), "--data", f"npz:{npz}", *FAST, "--batch-sizes", "1"])
    assert r.exit_code == 2 and "outside 0..9" in r.text and "row 2: label 99" in r.text


def test_profile_and_calibrate_on_measured_time(bundle, tmp_path):
    """profile writes bench --exit-times' measurement with what it was measured on; calibrate --cost checks
    that it describes this model and batch size, and refuses thresholds slower than the un-gated model."""
    from dgate_export import profile as profile_mod
    from dgate_export.manifest import load_manifest, write_manifest

    out = tmp_path / "profile.json"
    result = CliRunner().invoke(main, ["profile", str(bundle), "--batch-size", "1,8", "--min-seconds", "0.05",
                                       "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    prof = json.loads(out.read_text())
    manifest = load_manifest(bundle)
    assert prof["schema"] == profile_mod.SCHEMA and [b["batch_size"] for b in prof["batches"]] == [1, 8]
    assert prof["bundle"]["fingerprint"] == profile_mod.fingerprint(manifest)
    assert prof["bundle"]["exits"] == ["layer1", "layer2.0"] and len(prof["machine"]["load_average"]) == 6
    for entry in prof["batches"]:
        assert len(entry["exit_time_costs"]) == 3 and min(entry["exit_time_costs"]) > 0
    costs, info = profile_mod.load_costs(out, batch_size=8, manifest=manifest)
    assert costs == prof["batches"][1]["exit_time_costs"] and info["batch_size"] == 8
    # re-calibrated thresholds keep the fingerprint; other engines do not
    manifest.segments[0].gate.threshold = 0.123
    write_manifest(bundle, manifest)
    assert profile_mod.fingerprint(load_manifest(bundle)) == prof["bundle"]["fingerprint"]
    other = dict(prof, bundle=dict(prof["bundle"], fingerprint="0" * 64))
    (tmp_path / "other.json").write_text(json.dumps(other))
    for path, kwargs, message in (
            (tmp_path / "other.json", {"batch_size": 1, "manifest": manifest}, "another bundle"),
            (out, {"batch_size": 256, "manifest": manifest}, "not at 256"),
            (out, {"batch_size": None, "manifest": manifest}, "--cost-batch"),
            (out, {"batch_size": 1, "model_structure": {"exits": ["layer1"], "segment_flops": [1, 2],
                                                          "head_flops": [1]}}, "other exits or FLOPs"),
            (tmp_path / "missing.json", {"batch_size": 1}, "no such file"),
            (bundle / "manifest.json", {"batch_size": 1}, "not a dgate-profile/1 profile")):
        with pytest.raises(UserError, match=message):
            profile_mod.load_costs(path, **kwargs)

    # calibrate --cost on the bundle's checkpoint: a profile made up to tell time from FLOPs apart
    model_path = bundle.parent / "model.pt"
    data = small_npz(tmp_path)

    def calibrate(costs, *target_args):
        prof["batches"] = [{"batch_size": 1, "exit_time_costs": costs}]
        out.write_text(json.dumps(prof))
        target = tmp_path / "timed.pt"
        res = CliRunner().invoke(main, ["calibrate", str(model_path), "--data", f"npz:{data}", "--val-size", "600",
                                        *target_args, "--cost", str(out), "--no-progress", "-o", str(target)])
        return res, target

    res, target = calibrate([0.5, 0.8, 1.05], "--budget", "0.7")
    assert res.exit_code == 0, res.output
    curve = json.loads(target.with_suffix(".curve.json").read_text())
    assert curve["cost"]["expected"] <= 0.7 + 1e-9 and "measured time at batch 1" in curve["method"]
    assert "expected measured time: " in res.output
    # FLOPs figures of the same thresholds in the report
    assert curve["validation"]["baseline_flops"] == checkpoint.load(model_path).flops["baseline"]
    target.unlink()
    target.with_suffix(".curve.json").unlink()
    target.with_suffix(".curve.png").unlink()
    res, target = calibrate([1.02, 1.1, 1.2], "--max-drop", "0.05", "--guarantee", "none")  # no exit pays for itself
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "gating would slow it down" in text and "Disable the gates" in text
    assert not target.exists() and not target.with_suffix(".curve.json").exists()


def small_npz(tmp_path):
    """600 validation and 300 test rows of Fashion-MNIST as an npz."""
    from dgate_export.data import load_dataset

    data = tmp_path / "data.npz"
    val, test = load_dataset("fashion-mnist", "val").subset(600, seed=0), load_dataset("fashion-mnist", "test")
    np.savez(data, x_train=val.x[:10], y_train=val.y[:10], x_val=val.x, y_val=val.y, x_test=test.x[:300],
             y_test=test.y[:300])
    return data


@pytest.mark.slow
def test_calibrate_engine_rewrites_only_the_thresholds(bundle, tmp_path):
    """calibrate --engine fits the thresholds to the bundle's own confidences (fp32 here, then an fp16 build of
    the same model), rewrites them and a record in manifest.json, and the bundle still verifies."""
    from dgate_export.calibrate import calibrate_scores
    from dgate_export.manifest import load_manifest, verify_bundle
    from dgate_export.recalibrate import exit_scores
    from dgate_export.runtime import GatedRuntime

    data = small_npz(tmp_path)
    model_path = bundle.parent / "model.pt"
    before = load_manifest(bundle).to_dict()
    raw = (bundle / "manifest.json").read_bytes()

    def run(*args):
        res = CliRunner().invoke(main, ["calibrate", *map(str, args)])
        res.text = " ".join(res.output.split())
        return res

    # user mistakes change nothing
    for args, message in (([model_path, "--engine", bundle], "MODEL"), (["--engine", bundle, "-o", "x.pt"], "-o"),
                          (["--engine", bundle, "--delta", 2], "delta"),
                          (["--engine", bundle, "--cost", tmp_path / "none.json"], "no such file")):
        res = run(*args, "--data", f"npz:{data}", "--val-size", 600, "--budget", 0.6)
        assert res.exit_code == 2 and message in res.text, res.output
        assert (bundle / "manifest.json").read_bytes() == raw
    res = run("--engine", bundle, "--data", f"npz:{data}", "--val-size", 600, "--budget", 0.6)
    assert res.exit_code == 0, res.output
    after = verify_bundle(bundle)  # every artifact's sha256 still holds
    record = after.calibration
    assert record["mode"] == "budget" and record["data"]["rows"] == 600 and record["on"]["precision"] == "fp32"
    assert record["previous_thresholds"] == [g["gate"]["threshold"] for g in before["segments"][:-1]]
    changed = after.to_dict()
    for seg in changed["segments"]:
        if seg["gate"]:
            seg["gate"]["threshold"] = before["segments"][seg["index"]]["gate"]["threshold"]
    # nothing else moved; the drift reference is rewritten for the new thresholds
    assert {k: v for k, v in changed.items() if k not in ("calibration", "exit_reference")} == before
    assert after.exit_reference["by"] == "calibrate --engine" and after.exit_reference["rows"] == 600
    assert after.exit_reference["thresholds"] == pytest.approx(after.thresholds)
    shown = " ".join(CliRunner().invoke(main, ["inspect", str(bundle)]).output.split())
    assert "thresholds fitted to this bundle's confidences" in shown and "expected FLOPs are at most 0.6" in shown
    # the thresholds are calibrate's choice on the runtime's own confidences, and keep the budget when run
    val = __import__("dgate_export.data", fromlist=["load_dataset"]).load_dataset(f"npz:{data}", "val")
    rt = GatedRuntime.load(bundle)
    conf, correct = exit_scores(rt, val.x, val.y)
    costs = [float(c) for c in np.cumsum([s.flops + (s.gate.head_flops if s.gate else 0) for s in after.segments])]
    expected = calibrate_scores(conf, correct, confidence=after.confidence, costs=costs,
                                baseline_flops=after.baseline.flops, target=Target(budget=0.6),
                                num_classes=after.num_classes)
    assert after.thresholds == expected.thresholds
    ran = rt.run(val.x)
    assert float(np.dot(ran.exit_counts, costs)) / len(val.y) <= 0.6 * after.baseline.flops + 1e-6
    rt.close()

    # fp16: the bundle's confidences differ from the torch model's, and so do the thresholds fitted to them
    from dgate_export.compile.quantize import CalibrationData

    # build --precision fp16 --calibration-data refits the thresholds to the fp16 graphs before the rename
    refit = CalibrationData(data=f"npz:{data}", target=Target(max_drop=0.0, guarantee="none"))
    fp16 = build_bundle(model_path, tmp_path / "fp16",
                        BuildOptions(precision="fp16", max_batch=64, calibration=refit),
                        progress=lambda *a, **k: None)
    built = verify_bundle(fp16)
    assert built.calibration["on"]["precision"] == "fp16" and built.calibration["data"]["rows"] == 600
    res = run("--engine", fp16, "--data", f"npz:{data}", "--val-size", 600, "--max-drop", 0.0, "--guarantee", "none")
    assert res.exit_code == 0, res.output
    assert verify_bundle(fp16).thresholds == built.thresholds  # the same fit, twice
    res = bench(["--engine", str(fp16), "--data", "fashion-mnist", "--limit", "300", "--batch-sizes", "8", *FAST])
    assert res.exit_code == 0, res.output  # float32 data reaches the fp16 baseline as float16
    torch_fit = run(model_path, "--data", f"npz:{data}", "--val-size", 600, "--max-drop", 0.0, "--guarantee", "none",
                    "-o", tmp_path / "torch_fit.pt")
    assert torch_fit.exit_code == 0, torch_fit.output
    fp16_thresholds = verify_bundle(fp16).thresholds
    torch_thresholds = checkpoint.load(tmp_path / "torch_fit.pt").thresholds
    rt16 = GatedRuntime.load(fp16)
    conf16, _ = exit_scores(rt16, val.x, val.y)
    rt16.close()
    assert not np.array_equal(conf16, conf)  # fp16 arithmetic moved the confidences
    assert fp16_thresholds != pytest.approx(torch_thresholds, abs=1e-6)


def test_plot_without_matplotlib_is_refused_before_measuring(bundle, tmp_path, monkeypatch):
    """bench --plot on the plain install (no matplotlib): refused at once, naming the [plot] extra, before
    any timing (the --json figures would otherwise be measured and then the command fail)."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = bench(["--engine", str(bundle), "--random", "8", "--batch-sizes", "1", *FAST,
                 "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert out.exit_code == 2 and "dgate-export[plot]" in " ".join(out.output.split()), out.output
    assert list(tmp_path.iterdir()) == []
