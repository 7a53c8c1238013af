"""`dgate-export bench`: the report's figures agree with each other, on real data and on random input."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dgate_export import checkpoint, zoo
from dgate_export.bench import LATENCY_KEYS, SCHEMA, check_report
from dgate_export.build import build_bundle
from dgate_export.cli import main
from dgate_export.gated import GatedModel

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
        from dgate_export.gates import confidence_torch
        model.thresholds = [float(confidence_torch("max-softmax", logits).median()) for logits in model(x)[:-1]]
    path = checkpoint.save(model, tmp / "model.pt")
    return build_bundle(path, tmp / "bundle", max_batch=64, progress=lambda *a, **k: None)


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
    # leaving at gate 0 runs one of three sessions: cheaper than running them all
    assert costs[0] < costs[-1]
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
