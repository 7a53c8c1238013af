"""`build --precision int8` (quantize.py): a small zoo model quantized, checked and refitted on real
Fashion-MNIST rows; corrupted calibration sets refused before any export, leaving nothing behind."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from export_models import gated, save

from dgate_export.calibrate import Target
from dgate_export.cli import main
from dgate_export.compile import quantize
from dgate_export.compile.build import BuildOptions, build_bundle
from dgate_export.data import load_dataset
from dgate_export.errors import UserError
from dgate_export.manifest import Manifest, load_manifest
from dgate_export.runtime import GatedRuntime

VAL = 300


def _quiet(_line: str) -> None:
    pass


def _npz(path, x, y):
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A ResNet-20 (width 8, stride-2 stem) gated at its default exits, and 1200 real Fashion-MNIST training rows as
    an npz: 900 training rows (calibration), 300 validation rows (the split the model records). Backbone
    and gates trained briefly on the 900 rows: a random network's near-tied logits flip under any
    rounding, which says nothing about int8 (a few seconds)."""
    from dgate_export.compile.threads import torch_threads
    from dgate_export.compile.train import train_backbone, train_gates

    root = tmp_path_factory.mktemp("int8")
    train = load_dataset("fashion-mnist", "train")
    data = _npz(root / "fm.npz", train.x[:1200], train.y[:1200])
    model = gated("resnet20", kwargs={"width": 8, "stem_stride": 2}, input_shape=(1, 28, 28), num_classes=10,
                  data_split={"data": data, "val_size": VAL, "seed": 0}, thresholds=[0.6, 0.6, 0.6])
    rows = load_dataset(data, "train", val_size=VAL, seed=0)
    # two torch threads whatever the run's count (pytest-xdist workers get one): the sums' order, and so
    # this small network's weights, depend on it, and the int8 and refit checks sit near their bounds
    with torch_threads(2):
        train_backbone(model.backbone, rows, epochs=1, batch_size=32, progress=False)
        train_gates(model, rows, epochs=2, progress=False)
    model.eval()
    return save(model, root / "r20.pt"), data, root


def _options(data, rows=256, **kw):
    # 300 validation rows are too few for calibrate's default promise (Learn then Test): hold the drop on them.
    return quantize.CalibrationData(data=data, rows=rows, **kw, target=Target(guarantee="none"))


@pytest.mark.slow
def test_int8_build_passes_its_checks(small, tmp_path):
    path, data, _ = small
    lines: list[str] = []
    out = build_bundle(path, tmp_path / "b",
                       BuildOptions(precision="int8", max_batch=64, exporter="torchscript", calibration=_options(data)),
                       progress=lines.append)
    m = load_manifest(out)
    assert m.precision == "int8" and m.input.dtype == "float32"
    q = m.quantization
    assert q["calibration"]["rows"] == 256
    assert q["calibration"]["source"] == {"data": data, "split": "train", "val_size": VAL, "seed": 0, "row_seed": 0}
    check = q["check"]
    tol = quantize.INT8_TOLERANCE
    assert max(check["logit_errors"]) <= tol.logit_rel and min(check["prediction_agreement"]) >= tol.prediction_agreement
    assert min(check["decision_agreement"].values()) >= tol.decision_agreement
    assert any(line.startswith("[6/10] quantize") for line in lines)
    # The thresholds are the int8 graphs' own: recomputed here from the bundle on the validation rows.
    val = load_dataset(data, "val", val_size=VAL, seed=0)
    rt = GatedRuntime.load(out)
    from dgate_export.calibrate import calibrate_scores
    from dgate_export.compile.checkpoint import load
    from dgate_export.recalibrate import exit_scores

    model = load(path)
    conf, correct = exit_scores(rt, val.x, val.y)
    fit = calibrate_scores(conf, correct, confidence=model.confidence, costs=model.exit_costs(),
                           baseline_flops=model.count_flops()["baseline"],
                           target=Target(max_drop=0.01, guarantee="none"), num_classes=m.num_classes)
    assert list(m.thresholds) == pytest.approx(fit.thresholds)
    assert m.calibration["on"]["precision"] == "int8" and m.calibration["data"]["rows"] == VAL
    assert q["thresholds"]["fp32_thresholds"] == [0.6, 0.6, 0.6]
    # Every graph is quantized; the gate heads and the first convolution stay float.
    for seg in m.segments:
        graph = onnx.load(str(out / seg.file)).graph
        ops = [n.op_type for n in graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        gemms = [n for n in graph.node if n.op_type == "Gemm"]
        if seg.gate is not None:  # the gate head is float (the backbone's own classifier is int8)
            assert gemms and all(not set(n.input) & dq_out for n in gemms)
        if seg.index == 0:
            first = next(n for n in graph.node if n.op_type == "Conv")
            assert first.input[0] == "input" and first.input[1] not in dq_out
    res = rt.run(val.x[:50])
    assert res.exit_counts.sum() == 50
    # inspect shows the precision and the calibration.
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0 and "precision int8" in shown.output and "calibrated on 256 rows" in shown.output


@pytest.mark.slow
def test_int8_out_of_bounds_fails_the_build_and_leaves_nothing(small, tmp_path, monkeypatch):
    path, data, _ = small
    monkeypatch.setattr(quantize, "INT8_TOLERANCE", quantize.Int8Tolerance(logit_rel=1e-4))
    with pytest.raises(UserError) as info:
        build_bundle(path, tmp_path / "b",
                     BuildOptions(precision="int8", max_batch=64, exporter="torchscript", calibration=_options(data)),
                     progress=_quiet)
    assert "step 6/10 (quantize)" in info.value.message and "segment 0" in info.value.message
    assert "more than 0.0001" in info.value.message and "--calibration-rows" in info.value.hint
    assert list(tmp_path.iterdir()) == []


def _corrupted(root, train):
    x, y = train.x[:1200].copy(), train.y[:1200]
    nan = x.copy()
    nan[[3, 700]] = np.nan  # rows of the training part (the seeded validation split takes 300 others)
    return {
        # rows are checked as they are read: the calibration rows (read first) hold row 3, not 700
        "NaN": (_npz(root / "nan.npz", nan, y), 256, r"NaN or inf values in 1 row\(s\) \(rows 3\)"),
        "shape": (_npz(root / "shape.npz", x[:, :, :14, :14], y), 256, "expects input of shape"),
        "few rows": (_npz(root / "few.npz", x[:400], y[:400]), 256, "has 100 rows; --calibration-rows asks for 256"),
        "rows below minimum": (_npz(root / "fm2.npz", x, y), 8, "at least 32"),
    }


def test_corrupted_calibration_data_is_refused_before_export(small, tmp_path):
    path, _, root = small
    train = load_dataset("fashion-mnist", "train")
    for name, (data, rows, phrase) in _corrupted(root, train).items():
        lines: list[str] = []
        with pytest.raises(UserError, match=phrase) as info:
            build_bundle(path, tmp_path / "engines" / "b",
                         BuildOptions(precision="int8", exporter="torchscript", calibration=_options(data, rows)),
                         progress=lines.append)
        assert "step 1/10 (load)" in info.value.message, name
        assert lines == [], name  # nothing exported
        assert list(tmp_path.iterdir()) == [], name  # not even the parent directory


def test_cli_int8_flags(small, tmp_path):
    path, data, _ = small
    runner = CliRunner()
    result = runner.invoke(main, ["build", str(path), "-o", str(tmp_path / "b"), "--precision", "int8"])
    assert result.exit_code == 2 and "--calibration-data" in result.output
    result = runner.invoke(main, ["build", str(path), "-o", str(tmp_path / "b"), "--calibration-data", data,
                                  "--max-drop", "0.02"])
    assert result.exit_code == 2 and "only apply to --precision int8" in result.output
    assert list(tmp_path.iterdir()) == []


def test_manifest_requires_quantization_exactly_for_int8(tmp_path):
    from tiny_bundle import make_tiny_bundle

    bundle, _ = make_tiny_bundle(tmp_path / "t")
    data = json.loads((bundle / "manifest.json").read_text())
    for precision, quantization in (("int8", None), ("fp32", {"method": "x"})):
        bad = dict(data, precision=precision)
        if quantization is not None:
            bad["quantization"] = quantization
        with pytest.raises(UserError, match="quantization"):
            Manifest.from_dict(bad)


@pytest.mark.slow
def test_refit_defaults_to_the_target_the_model_records(small, tmp_path):
    """build's refit (fp16 here; int8 takes the same path) uses the target the model was calibrated for
    when no target flag is given; an older checkpoint without a record gets the default target."""
    from dgate_export.compile import checkpoint

    path, data, root = small
    model = checkpoint.load(path)
    recorded = Target(max_drop=0.02, guarantee="none")
    model.calibration = {"target": recorded.to_dict(), "thresholds": list(model.thresholds),
                         "exit_fractions": [0.25] * 4, "rows": VAL}
    with_record = checkpoint.save(model, root / "recorded.pt")
    common = ["--precision", "fp16", "--calibration-data", data, "--max-batch", "64", "--exporter", "torchscript"]

    def build(model_path, out, *extra):
        res = CliRunner().invoke(main, ["build", str(model_path), "-o", str(tmp_path / out), *common, *extra])
        return res, " ".join(res.output.split())

    res, text = build(with_record, "rec")
    assert res.exit_code == 0, res.output
    assert "target max_drop 0.02, guarantee none, delta 0.1 (recorded in the model)" in text
    rec = load_manifest(tmp_path / "rec")
    assert rec.calibration["target_options"] == recorded.to_dict()
    # the drift reference: the refit's own exit mix on the validation rows, for the refitted thresholds
    assert rec.exit_reference["by"] == "calibrate --engine" and rec.exit_reference["rows"] == VAL
    assert rec.exit_reference["thresholds"] == pytest.approx(rec.thresholds)
    assert rec.exit_reference["exit_fractions"] == pytest.approx(rec.calibration["validation"]["exit_fractions"])
    # an fp32 build keeps the checkpoint's thresholds, and its calibration exit mix as the reference
    res = CliRunner().invoke(main, ["build", str(with_record), "-o", str(tmp_path / "fp32"), "--max-batch", "64",
                                    "--exporter", "torchscript"])
    assert res.exit_code == 0, res.output
    fp32 = load_manifest(tmp_path / "fp32")
    assert fp32.exit_reference["exit_fractions"] == [0.25] * 4 and fp32.exit_reference["rows"] == VAL
    assert "checkpoint" in fp32.exit_reference["by"] and fp32.source["calibration"]["target"] == recorded.to_dict()
    res, text = build(with_record, "given", "--max-drop", "0.05", "--guarantee", "none")
    assert res.exit_code == 0, res.output
    assert load_manifest(tmp_path / "given").calibration["target_options"] == Target(
        max_drop=0.05, guarantee="none").to_dict()
    res, text = build(path, "old")  # no record: the default target
    assert res.exit_code == 0, res.output
    assert "target max_drop 0.01, guarantee ltt, delta 0.1 (default)" in text
    assert load_manifest(tmp_path / "old").calibration["target_options"] == Target().to_dict()
