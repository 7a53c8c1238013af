"""The CLI's front door: help without heavy imports, user errors as one paragraph with exit status 2."""

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from dgate_export.cli import main
from dgate_export.data import load_dataset
from dgate_export.errors import UserError


def test_help_needs_neither_torch_nor_tensorrt():
    code = ("import sys; from click.testing import CliRunner; from dgate_export.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'build' in r.output and 'bench' in r.output; "
            "bad = [m for m in ('torch', 'tensorrt', 'onnx') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tensorrt_flags_are_refused_for_onnxruntime(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"not used")
    r = CliRunner().invoke(main, ["build", str(model), "--opt-batch", "8", "--tf32"])
    assert r.exit_code == 2
    assert "--opt-batch, --tf32 only apply to --backend tensorrt" in " ".join(r.output.split())
    assert not (tmp_path.parent / "engines").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_unknown_import_is_a_user_error():
    r = CliRunner().invoke(main, ["--import", "no_such_module_xyz", "inspect", "."])
    assert r.exit_code == 2 and "no_such_module_xyz" in r.output and "Traceback" not in r.output


def test_cuda_graphs_on_onnxruntime_need_the_cuda_provider(tmp_path):
    from tiny_bundle import make_tiny_bundle

    bundle, _ = make_tiny_bundle(tmp_path, max_batch=4)
    r = CliRunner().invoke(main, ["bench", "--engine", str(bundle), "--random", "8", "--cuda-graphs"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "cuda_graphs needs ONNX Runtime's CUDA provider" in " ".join(r.output.split())


# A bad calibration target (calibrate.Target checks itself when made) is refused by every command that takes one
# before anything is loaded: the model and data named here do not exist, so a later check would name them instead.
TARGET_COMMANDS = {
    "gate": ["gate", "--arch", "resnet20", "--data", "npz:{missing}.npz", "-o", "{tmp}/m.pt"],
    "calibrate": ["calibrate", "{missing}.pt", "--data", "npz:{missing}.npz"],
    "calibrate --engine": ["calibrate", "--engine", "{missing}", "--data", "npz:{missing}.npz"],
    "build int8": ["build", "{missing}.pt", "-o", "{tmp}/b", "--precision", "int8", "--calibration-data",
                   "npz:{missing}.npz"],
    "build fp16": ["build", "{missing}.pt", "-o", "{tmp}/b", "--precision", "fp16", "--calibration-data",
                   "npz:{missing}.npz"],
}


@pytest.mark.parametrize("bad, named", [(["--max-drop", "-1"], "max_drop -1.0"), (["--delta", "1.5"], "delta 1.5"),
                                        (["--budget", "0"], "budget 0.0"), (["--holdout", "1"], "holdout 1.0")])
@pytest.mark.parametrize("command", sorted(TARGET_COMMANDS))
def test_a_bad_target_is_refused_before_any_data_is_loaded(command, bad, named, tmp_path):
    args = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in TARGET_COMMANDS[command]]
    r = CliRunner().invoke(main, [*args, *bad])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert named in " ".join(r.output.split()), r.output
    assert list(tmp_path.iterdir()) == []


def test_messages_name_only_options_the_command_has(tmp_path):
    """Too few rows for the recorded validation split: no advice to pass a --val-size that calibrate --engine
    and build would refuse (they use the split the model records)."""
    from tiny_bundle import SHAPE, make_tiny_bundle

    from dgate_export.manifest import load_manifest, write_manifest

    bundle, _ = make_tiny_bundle(tmp_path / "bundle", max_batch=4)
    manifest = load_manifest(bundle)
    manifest.source = {"data_split": {"data": "npz:rows.npz", "val_size": 600, "seed": 0}}
    write_manifest(bundle, manifest)
    data = tmp_path / "three.npz"
    np.savez(data, x=np.zeros((3, *SHAPE), np.float32), y=np.zeros(3, np.int64))
    r = CliRunner().invoke(main, ["calibrate", "--engine", str(bundle), "--data", f"npz:{data}"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "600 rows does not fit its 3 training rows" in text, r.output
    assert "--val-size" not in text and "between 1 and" not in text
    one = tmp_path / "one.npz"
    np.savez(one, x=np.zeros((1, *SHAPE), np.float32), y=np.zeros(1, np.int64))
    with pytest.raises(UserError) as info:
        load_dataset(f"npz:{one}", "train", val_size=1)
    assert "between 1 and 0" not in str(info.value) and "--" not in str(info.value)
