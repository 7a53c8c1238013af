"""build.py and the `build` / `inspect` commands: real checkpoints built into real bundles, checked by the
ONNX checker and the parity step, then run by the runtime; every failure leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from export_models import gated, save

from dgate_export.backends import get_backend
from dgate_export.cli import main
from dgate_export.compile import checkpoint
from dgate_export.compile.build import BuildOptions, build_bundle
from dgate_export.compile.parity import abs_error, probe_thresholds, rel_error, within
from dgate_export.errors import UserError
from dgate_export.manifest import load_manifest, verify_bundle


def _quiet(_line: str) -> None:
    pass


def _listing(path):
    return sorted(p.name for p in path.iterdir())


def test_probe_thresholds_split_every_gate_and_avoid_rows():
    rng = np.random.default_rng(0)
    conf = [rng.uniform(0.2, 0.9, 64) for _ in range(3)]
    thresholds = probe_thresholds(conf)
    alive = np.arange(64)
    for c, t in zip(conf, thresholds):
        leave = c[alive] >= t
        assert 0 < leave.sum() < len(alive)
        assert np.abs(c[alive] - t).min() > 0
        alive = alive[~leave]
    # saturated confidences: nobody sits on the threshold; all-equal: everybody continues
    saturated = np.array([1.0] * 60 + [0.9, 0.95, 0.97, 0.99])
    t = probe_thresholds([saturated])[0]
    assert 0.99 < t < 1.0
    assert probe_thresholds([np.ones(8)]) == [2.0]


def test_parity_criterion_never_passes_nan_or_inf():
    assert within(1e-5, 1e-4) and within(1e-4, 1e-4) and not within(2e-4, 1e-4)
    assert not within(float("nan"), 1e-4) and not within(float("inf"), 1e-4)
    ref = np.array([[2.0, -4.0]], dtype=np.float32)
    assert rel_error(np.array([[2.0, -3.0]], np.float32), ref) == pytest.approx(0.25)
    assert rel_error(np.array([[np.nan, -4.0]], np.float32), ref) == float("inf")
    assert abs_error(np.array([0.5, np.inf], np.float32), np.array([0.5, 0.5])) == float("inf")
    assert abs_error(np.array([np.nan, 0.5], np.float32), np.array([0.5, 0.5])) == float("inf")
    assert rel_error(ref, np.array([[np.nan, 1.0]])) == float("inf")  # a NaN in torch fails as well


def test_a_wrong_carry_link_fails_the_build_at_parity(tmp_path, skip_ckpt, monkeypatch):
    """The ONNX graphs are right but the bundle links segment 1's two carries crosswise (prev_carry_0 takes
    carry_1, both [rows, 4, 8, 8]): parity runs the draft bundle through GatedRuntime and fails the build."""
    from dgate_export.manifest import Segment

    right = Segment.carry_inputs

    def crossed(segment):
        links = right.fget(segment)
        return [(dst, src) for (dst, _), (_, src) in zip(links, links[::-1])]

    monkeypatch.setattr(Segment, "carry_inputs", property(crossed))
    path, _ = skip_ckpt
    lines = []
    with pytest.raises(UserError) as info:
        build_bundle(path, tmp_path / "out", BuildOptions(max_batch=32), progress=lines.append)
    assert "step 5/9 (parity)" in str(info.value) and "exit 1's logits differ" in str(info.value)
    assert not any(line.startswith("[6/9]") for line in lines)  # no engine was built
    assert _listing(tmp_path) == []


def _check_bundle(out, model, precision="fp32", max_batch=256):
    """The manifest agrees with the model, the hashes hold, and the runtime reproduces the torch reference."""
    from dgate_export.runtime import GatedRuntime

    manifest = verify_bundle(out)
    k = model.num_gates
    assert _listing(out) == sorted(["manifest.json", "baseline.onnx"] + [f"segment{i}.onnx" for i in range(k + 1)])
    assert manifest.precision == precision and manifest.max_batch == max_batch
    assert manifest.thresholds == pytest.approx(model.thresholds)
    assert [s.gate.exit for s in manifest.segments[:-1]] == model.exits
    assert manifest.num_classes == model.num_classes
    assert manifest.input.shape == ["batch", *model.input_shape]
    flops = model.flops
    assert [s.flops for s in manifest.segments] == flops["segments"]
    assert [s.gate.head_flops for s in manifest.segments[:-1]] == flops["heads"]
    assert manifest.baseline.flops == flops["baseline"]
    parity = manifest.source["parity"]
    probe = parity["passes"][1]
    assert all(c > 0 for c in probe["exit_counts"][:k]), probe  # every gate saw exits …
    assert sum(probe["exit_counts"][1:]) > 0  # … and continuations

    # The runtime on the bundle vs the torch reference, with thresholds that split the batch.
    x = torch.randn(40, *model.input_shape, generator=torch.Generator().manual_seed(3))
    reference = model.half() if precision == "fp16" else model
    xr = x.to(next(reference.parameters()).dtype)
    with torch.no_grad():
        conf = [torch.softmax(lg.float(), 1).amax(1).numpy() for lg in reference(xr)[:-1]]
        thresholds = probe_thresholds(conf)
        ref = reference.early_exit(xr, thresholds)
    runtime = GatedRuntime.load(out, thresholds=thresholds)
    result = runtime.run(xr.numpy())
    assert np.array_equal(result.exits, ref.exits.numpy())
    tol = 2e-2 if precision == "fp16" else 1e-4
    scale = max(1.0, float(ref.logits.float().abs().max()))
    assert np.abs(result.logits - ref.logits.float().numpy()).max() <= tol * scale
    return manifest


@pytest.fixture(scope="module")
def skip_ckpt(tmp_path_factory):
    model = gated(thresholds=[0.6, 0.5])
    path = save(model, tmp_path_factory.mktemp("ckpt") / "skip.pt")
    return path, model


def test_build_skip_model(tmp_path, skip_ckpt):
    path, _ = skip_ckpt
    lines = []
    out = build_bundle(path, tmp_path / "bundles" / "skip", BuildOptions(max_batch=32), progress=lines.append)
    assert out == tmp_path / "bundles" / "skip"
    assert _listing(tmp_path / "bundles") == ["skip"]  # no temporary directory left beside it
    manifest = _check_bundle(out, checkpoint.load(path), max_batch=32)
    # two tensors cross each cut
    assert manifest.segments[0].carries == ["carry_0", "carry_1"]
    assert manifest.segments[1].input_names == ["prev_carry_0", "prev_carry_1", "index"]
    assert manifest.segments[1].inputs[0].shape == ["rows", 4, 8, 8]
    assert manifest.tools["exporter"] == "dynamo" and manifest.backend_info["onnxruntime"]
    assert manifest.source["checkpoint"] == "skip.pt"
    assert [line.split()[1] for line in lines if line.startswith("[")] == [
        "load", "flops", "export", "check", "parity", "engines", "manifest", "verify", "rename"]
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fp16_skip_model(tmp_path, skip_ckpt):
    path, _ = skip_ckpt
    out = build_bundle(path, tmp_path / "skip16", BuildOptions(precision="fp16", max_batch=32),
                       progress=_quiet)
    manifest = _check_bundle(out, checkpoint.load(path), precision="fp16", max_batch=32)
    assert manifest.input.dtype == "float16"
    assert manifest.segments[0].outputs[-1].dtype == "float32"  # confidence


def test_torchscript_exporter(tmp_path, skip_ckpt):
    path, _ = skip_ckpt
    out = build_bundle(path, tmp_path / "ts", BuildOptions(max_batch=32, exporter="torchscript"),
                       progress=_quiet)
    manifest = _check_bundle(out, checkpoint.load(path), max_batch=32)
    assert manifest.tools["exporter"] == "torchscript"


def test_default_output_and_force(tmp_path, skip_ckpt, monkeypatch):
    path, _ = skip_ckpt
    monkeypatch.chdir(tmp_path)
    out = build_bundle(path, None, BuildOptions(max_batch=8, exporter="torchscript"), progress=_quiet).resolve()
    assert out.resolve() == tmp_path / "engines" / "skip"
    before = (out / "manifest.json").read_text()

    with pytest.raises(UserError, match="already exists") as info:
        build_bundle(path, None, BuildOptions(max_batch=8, exporter="torchscript"), progress=_quiet)
    assert "--force" in str(info.value)
    assert (out / "manifest.json").read_text() == before

    # --force with a build that fails keeps the old bundle
    with pytest.raises(UserError):
        build_bundle(path, None, BuildOptions(max_batch=8, opset=1, force=True, exporter="torchscript"),
                     progress=_quiet)
    assert (out / "manifest.json").read_text() == before
    assert _listing(tmp_path / "engines") == ["skip"]

    build_bundle(path, None, BuildOptions(max_batch=16, force=True, exporter="torchscript"), progress=_quiet)
    assert load_manifest(out).max_batch == 16
    assert _listing(tmp_path / "engines") == ["skip"]


def test_force_never_replaces_a_directory_that_is_not_a_bundle(tmp_path, skip_ckpt):
    path, _ = skip_ckpt
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a bundle"):
        build_bundle(path, other, BuildOptions(force=True), progress=_quiet)
    assert _listing(other) == ["notes.txt"]


def _bad_file_cases(tmp_path, good):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    return [corrupt, truncated, empty, tmp_path / "missing.pt"]


def test_bad_checkpoints_leave_nothing(tmp_path, skip_ckpt):
    good, _ = skip_ckpt
    work = tmp_path / "work"
    work.mkdir()
    for bad in _bad_file_cases(tmp_path, good):
        with pytest.raises(UserError) as info:
            build_bundle(bad, work / "out", progress=_quiet)
        assert bad.name in str(info.value)
        assert _listing(work) == []
    # a parent directory the build had to create is removed again
    with pytest.raises(UserError):
        build_bundle(tmp_path / "truncated.pt", work / "new" / "deeper" / "out", progress=_quiet)
    assert _listing(work) == []


def test_unknown_and_missing_backends_are_refused_before_any_work(tmp_path, skip_ckpt):
    path, _ = skip_ckpt
    with pytest.raises(UserError, match="Unknown backend 'tensorflow'"):
        build_bundle(path, tmp_path / "out", BuildOptions(backend="tensorflow"), progress=_quiet)
    trt_ok, _ = get_backend("tensorrt", check=False).available()
    if not trt_ok:
        lines = []
        with pytest.raises(UserError, match="tensorrt backend cannot be used"):
            build_bundle(path, tmp_path / "out", BuildOptions(backend="tensorrt"), progress=lines.append)
        assert lines == []  # refused before step 1
    assert _listing(tmp_path) == []


def _unwritable(tmp_path) -> list[Path]:
    """Output paths that cannot be written: under /sys (read-only, for root too), under a file, and
    (not as root, whom permission bits do not stop) under a read-only folder."""
    (tmp_path / "a_file").write_text("x")
    paths = [Path("/sys/dgate-export-test/out"), tmp_path / "a_file" / "sub" / "out"]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        paths.append(locked / "nested" / "out")
    return paths


def test_unwritable_output_is_refused_before_any_work(tmp_path, skip_ckpt):
    path, _ = skip_ckpt
    for out in _unwritable(tmp_path):
        lines: list[str] = []
        with pytest.raises(UserError, match="cannot be written"):
            build_bundle(path, out, progress=lines.append)
        assert lines == []  # refused before step 1
    result = CliRunner().invoke(main, ["build", str(path), "-o", "/sys/dgate-export-test/out"])
    assert result.exit_code == 2 and "cannot be written" in result.output, result.output


def test_bad_options_are_refused(tmp_path, skip_ckpt):
    path, _ = skip_ckpt
    for kwargs, phrase in [({"precision": "int4"}, "precision"), ({"max_batch": 0}, "max batch"),
                           ({"exporter": "tf"}, "exporter"), ({"opset": 13, "exporter": "dynamo"}, "opset 13")]:
        with pytest.raises(UserError, match=phrase):
            build_bundle(path, tmp_path / "out", BuildOptions(**kwargs), progress=_quiet)
    assert _listing(tmp_path) == []


def test_failure_midway_leaves_nothing(tmp_path):
    path = save(gated("test_svdnet"), tmp_path / "svd.pt")
    out_parent = tmp_path / "engines"
    out_parent.mkdir()
    lines = []
    with pytest.raises(UserError) as info:
        build_bundle(path, out_parent / "svd", progress=lines.append)
    message = str(info.value)
    assert "step 3/9 (export)" in message and "segment 2 (after exit 'block2')" in message
    # the default exporter "auto" tried both: the message says so, and advises what is left to try
    assert "by the torchscript exporter" in message and "Before it, the dynamo exporter failed" in message
    assert "Both exporters failed" in message and "--opset" in message
    assert any("exporting again with the torchscript exporter" in line for line in lines)
    assert any("segment1.onnx" in line for line in lines)  # it really failed midway
    assert _listing(out_parent) == []
    with pytest.raises(UserError, match="Try `--exporter dynamo`"):  # one exporter asked for: the other advised
        build_bundle(path, out_parent / "svd", BuildOptions(exporter="torchscript"), progress=_quiet)
    assert _listing(out_parent) == []


@pytest.mark.slow
def test_build_retries_with_the_other_exporter_and_says_so(tmp_path):
    """A network only the TorchScript exporter exports: the default build says why and retries with it; a build
    asked for the dynamo exporter stops with that advice."""
    path = save(gated("test_numpytail"), tmp_path / "np.pt")
    lines: list[str] = []
    out = build_bundle(path, tmp_path / "b", BuildOptions(max_batch=8), progress=lines.append)
    manifest = load_manifest(out)
    assert manifest.tools["exporter"] == "torchscript"
    said = "\n".join(lines)
    assert "the dynamo exporter failed at step 3/9 (export)" in said and ".numpy()" in said, said
    assert "exporting again with the torchscript exporter (--exporter auto)" in said
    assert "[3/9] export" in said and "torchscript exporter" in said and "built" in said
    assert _listing(tmp_path) == ["b", "np.pt"]
    with pytest.raises(UserError, match="Try `--exporter torchscript`"):
        build_bundle(path, tmp_path / "c", BuildOptions(max_batch=8, exporter="dynamo"), progress=_quiet)
    assert _listing(tmp_path) == ["b", "np.pt"]


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_build_and_inspect(tmp_path, skip_ckpt):
    path, _ = skip_ckpt
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(main, ["build", str(path), "-o", str(out), "--max-batch", "8", "--exporter",
                                  "torchscript"])
    assert result.exit_code == 0, result.output
    assert "[5/9] parity" in result.output and "built" in result.output

    result = runner.invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("segments", "block1", "block2", "prev_carry_1", "onnxruntime", "fp32", "all 4 artifacts match"):
        assert text in result.output, text

    again = runner.invoke(main, ["build", str(path), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output

    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    with open(damaged / "segment1.onnx", "ab") as f:
        f.write(b"\0")
    result = runner.invoke(main, ["inspect", str(damaged)])
    assert result.exit_code == 2
    assert "segment1.onnx (mismatch)" in result.output
    assert "segments" in result.output  # the table is still shown

    result = runner.invoke(main, ["inspect", str(path)])  # a checkpoint file: checkpoint.summarize, render.checkpoint_tables
    assert result.exit_code == 0, result.output
    assert "test_skipnet" in result.output
    assert "validation split: not recorded" in " ".join(result.output.split())

    result = runner.invoke(main, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no such file or directory" in " ".join(result.output.split())

    result = runner.invoke(main, ["build", str(path), "-o", str(tmp_path / "x"), "--backend", "nope"])
    assert result.exit_code == 2 and "Unknown backend" in result.output
    assert not (tmp_path / "x").exists()


def test_manifest_json_is_plain(tmp_path, skip_ckpt):
    """What a C++ reader sees: plain JSON, thresholds as numbers, no NaN."""
    path, _ = skip_ckpt
    out = build_bundle(path, tmp_path / "b", BuildOptions(max_batch=4, exporter="torchscript"),
                       progress=_quiet)
    data = json.loads((out / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["format"] == "dgate-bundle/1"
    assert [s["gate"]["threshold"] for s in data["segments"][:-1]] == [0.6, 0.5]


# ------------------------------------------------------------------------------------- real networks


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_zoo_resnet(tmp_path, precision):
    """The demo model: a small zoo ResNet with 3 gates on 1x28x28."""
    model = gated("resnet20", kwargs={"width": 8}, input_shape=(1, 28, 28), num_classes=10)
    path = save(model, tmp_path / "resnet20.pt")
    out = build_bundle(path, tmp_path / "resnet20", BuildOptions(precision=precision), progress=_quiet)
    _check_bundle(out, checkpoint.load(path), precision=precision)


@pytest.mark.slow
@pytest.mark.parametrize("arch,exporter", [("torchvision/resnet18", "dynamo"),
                                           # dynamo takes ~4x longer on DenseNet-121's 120 convolutions
                                           # (torch.export's tracing); built with it by hand, see the report
                                           ("torchvision/densenet121", "torchscript")])
def test_torchvision(tmp_path, arch, exporter):
    model = gated(arch, input_shape=(3, 32, 32), num_classes=10)
    assert model.num_gates == 3
    path = save(model, tmp_path / "tv.pt")
    out = build_bundle(path, tmp_path / "tv", BuildOptions(max_batch=64, exporter=exporter), progress=_quiet)
    _check_bundle(out, checkpoint.load(path), max_batch=64)


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout", [("test_tokens", "tokens-cls"), ("test_channels_last", "nhwc")])
def test_token_and_channels_last_exits_build(tmp_path, arch, layout):
    """Heads that take the class token or pool a channels-last map export and pass parity."""
    model = gated(arch, input_shape=(1, 8, 8), head="grid")
    assert model.feature_layouts == [layout]
    path = save(model, tmp_path / "m.pt")
    out = build_bundle(path, tmp_path / "b", BuildOptions(max_batch=16, exporter="torchscript"),
                       progress=_quiet)
    _check_bundle(out, checkpoint.load(path), max_batch=16)


@pytest.mark.slow
def test_parity_tolerance_scales_with_what_fp32_can_do(tmp_path):
    """Gate 0's features sit near 1e4 and its head's weights sum to zero per class, so its logits are
    O(1) differences of O(1e4) sums: float32 itself, torch against float64, errs by about 1e-3 of them,
    and ONNX Runtime by as much; the fixed limit 1e-4 failed such builds (ResNet-152's deep gates). The
    tolerance follows torch's own error against float64 and stays far below what a wrong graph gives
    (test_a_wrong_carry_link_fails_the_build_at_parity)."""
    torch.manual_seed(0)
    model = gated("resnet20", kwargs={"width": 4}, input_shape=(1, 16, 16), num_classes=10)
    with torch.no_grad():
        model.backbone.layer1[-1].bn2.bias.fill_(1e4)
        weight = model.heads[0].fc.weight
        weight.sub_(weight.mean(dim=1, keepdim=True))
    path = save(model, tmp_path / "m.pt")
    out = build_bundle(path, tmp_path / "b", BuildOptions(max_batch=64, exporter="torchscript"),
                       progress=_quiet)
    parity = load_manifest(out).source["parity"]
    assert parity["torch_vs_float64"]["logits"][0] > 1e-4  # float32 cannot do 1e-4 here, torch included
    assert 1e-4 < parity["logit_tolerances"][0] < 1e-2
    assert parity["logit_tolerances"][1:] == [1e-4] * 3  # elsewhere the floor: as strict as before
    assert parity["exit_logit_errors"][0] <= parity["logit_tolerances"][0]


def test_int8_calibration_data_too_small_names_no_missing_option(tmp_path, skip_ckpt):
    """One row of calibration data: the message was "Choose a validation size between 1 and 0" (build has no
    such option, and the range is empty)."""
    path, _ = skip_ckpt
    one = tmp_path / "one.npz"
    np.savez(one, x=np.zeros((1, 1, 8, 8), np.float32), y=np.zeros(1, np.int64))
    result = CliRunner().invoke(main, ["build", str(path), "-o", str(tmp_path / "b"), "--precision", "int8",
                                       "--calibration-data", f"npz:{one}"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "does not fit its 1 training rows" in text and "Use data with more training rows" in text, text
    assert "between 1 and" not in text and "--val-size" not in text
    assert _listing(tmp_path) == ["one.npz"]
