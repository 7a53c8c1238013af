"""The CLI's front door: help without heavy imports, user errors as one paragraph with exit status 2."""

import subprocess
import sys

from click.testing import CliRunner

from dgate_export.cli import main


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
