"""Outputs, as a careless or hostile user picks them: never destroyed what a command was not asked to write,
never a traceback (outputs.check_output, files.py).

The property test runs every command of the CLI group (read from `main.commands`, so a command added later
fails here until it has a recipe) with its output where nothing can be written, and asserts status 2, one
paragraph, nothing written, refused before the command's work (its other inputs are missing, so a later
refusal would name them instead). Read-only places that hold for root too: /sys (sysfs takes no new files),
a path under a file, and a bundle made immutable (chattr +i; chmod 555 where not root).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_bundle import SHAPE, make_tiny_bundle

from dgate_export import files
from dgate_export.cli import main
from dgate_export.errors import UserError
from dgate_export.manifest import load_manifest, verify_bundle
from dgate_export.outputs import BUNDLE, REPOSITORY, check_output, check_rewrite, kind_of

RO = Path("/sys/kernel")  # exists, a folder, and takes no new entry, whoever asks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    bundle, _ = make_tiny_bundle(tmp_path_factory.mktemp("outputs") / "bundle", thresholds=(0.6, 0.5), max_batch=8)
    return bundle


@pytest.fixture
def bundle(tiny, tmp_path):
    """A private copy of the tiny bundle (tests change it)."""
    return Path(shutil.copytree(tiny, tmp_path / "bundle"))


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    result.text = " ".join(result.output.split())  # the error paragraph is wrapped
    return result


def refused(result, *phrases):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a UserError, not a bug
    assert "Traceback" not in result.output, result.output
    assert result.output.startswith("error: ") or "\nError: " in result.output, result.output  # ours, or click's
    for phrase in phrases:
        assert phrase in result.text, (phrase, result.output)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: kind, size, mode and content hash (what 'nothing changed' means)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        digest = files.sha256_file(p) if p.is_file() else None
        out[str(p.relative_to(folder))] = (stat.S_IFMT(st.st_mode), st.st_size, stat.S_IMODE(st.st_mode), digest)
    return out


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` takes no new entry and no rename for the duration: immutable (chattr +i) as root, whom
    permission bits do not stop; mode 555 otherwise. Skips where neither is possible."""
    if os.geteuid() == 0:
        try:
            done = subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True)
        except FileNotFoundError:
            pytest.skip("cannot make a folder read-only for root here: no chattr")
        if done.returncode != 0:
            pytest.skip(f"cannot make a folder read-only for root here: {done.stderr.decode().strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)


# ------------------------------------------------------------------------ every command, read-only output

# command -> argument lists; {out}: the output name under a read-only folder, {bundle}: the tiny bundle,
# {missing}: a data or model file that does not exist (a refusal after loading would name it instead).
RECIPES: dict[str, list[list[str]]] = {
    "bench": [["--engine", "{bundle}", "--data", "npz:{missing}.npz", "--json", "{out}.json"],
              ["--engine", "{bundle}", "--data", "npz:{missing}.npz", "--plot", "{out}.png"]],
    "profile": [["{bundle}", "-o", "{out}.json"]],
    "calibrate": [["{missing}.pt", "--data", "npz:{missing}.npz", "-o", "{out}.pt"],
                  ["--engine", "{ro_bundle}", "--data", "npz:{missing}.npz"]],
    "build": [["{missing}.pt", "-o", "{out}"]],
    "gate": [["--arch", "resnet20", "--data", "npz:{missing}.npz", "-o", "{out}.pt"]],
    "score": [["{bundle}", "--data", "npz:{missing}.npz", "-o", "{out}.parquet"]],
    "triton": [["{bundle}", "-o", "{out}", "--platform", "python"]],
    "serve": [["{bundle}", "--repo", "{out}"]],
    "drift": [["{ro_bundle}", "--record", "npz:{missing}.npz"]],  # --record rewrites the bundle's manifest
}
WRITES_NOTHING = {"inspect"}  # commands without an output


def test_every_command_has_a_recipe():
    """A command added to the CLI must say here how it writes (or that it writes nothing)."""
    assert set(RECIPES) | WRITES_NOTHING == set(main.commands), set(main.commands) ^ (set(RECIPES) | WRITES_NOTHING)


@pytest.mark.parametrize("where", ["sys", "under_a_file"])
@pytest.mark.parametrize("command", sorted(RECIPES))
def test_every_command_refuses_an_output_it_cannot_write(command, where, bundle, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    out = RO / "dgate-export-test" if where == "sys" else tmp_path / "a_file" / "out"
    names = {"bundle": bundle, "missing": tmp_path / "missing", "out": out, "ro_bundle": bundle}
    for args in RECIPES[command]:
        before = snapshot(tmp_path)
        with read_only(bundle) if "{ro_bundle}" in args else contextlib.nullcontext():
            result = run(command, *[a.format(**names) for a in args])
        refused(result)
        assert "cannot be written" in result.text or "does not accept new files" in result.text, result.output
        assert snapshot(tmp_path) == before, (command, args)
    assert not any(RO.glob("dgate-export-test*"))


# ------------------------------------------------------------------------ over, into, around an input


def test_profile_never_overwrites_the_bundle_it_reads(bundle):
    before = snapshot(bundle)
    refused(run("profile", bundle, "-o", bundle / "manifest.json"), "lies inside", str(bundle))
    refused(run("profile", bundle, "-o", bundle), "is a directory")
    assert snapshot(bundle) == before
    verify_bundle(bundle)


def test_triton_force_replaces_only_a_repository(bundle, tmp_path):
    before = snapshot(bundle)
    refused(run("triton", bundle, "-o", bundle, "--force", "--platform", "python"), "which this command reads")
    assert snapshot(bundle) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    refused(run("triton", bundle, "-o", other, "--force", "--platform", "python"),
            "is not a Triton model repository", "todo.txt", "dgate-repository.json")
    assert (other / "todo.txt").read_text() == "keep me"
    twin = Path(shutil.copytree(bundle, tmp_path / "twin"))  # another bundle, not read by this command
    refused(run("triton", bundle, "-o", twin, "--force", "--platform", "python"), "it is a bundle")
    verify_bundle(twin)
    # its own kind: a repository is replaced with --force (and marked as one)
    repo = tmp_path / "repo"
    assert run("triton", bundle, "-o", repo, "--platform", "python").exit_code == 0
    assert kind_of(repo) == REPOSITORY
    assert run("triton", bundle, "-o", repo, "--force", "--platform", "python").exit_code == 0
    refused(run("build", tmp_path / "model.pt", "-o", repo, "--force"), "it is a Triton model repository")
    refused(run("serve", bundle, "--repo", repo), "already exists", "remove that folder")
    assert "--force" not in run("serve", bundle, "--repo", repo).text  # serve has no --force


def test_score_never_replaces_a_manifest(bundle, tmp_path):
    pytest.importorskip("pyarrow")
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((4, *SHAPE), np.float32))
    before = snapshot(bundle)
    refused(run("score", bundle, "--data", f"npz:{data}", "-o", bundle / "manifest.json", "--force"), "lies inside")
    refused(run("score", bundle, "--data", f"npz:{data}", "-o", data, "--force"), "which this command reads")
    assert snapshot(bundle) == before and data.stat().st_size > 0


def test_bench_and_model_outputs_never_replace_an_input(bundle, tmp_path):
    before = snapshot(bundle)
    refused(run("bench", "--engine", bundle, "--random", 8, "--json", bundle / "bench.json"), "lies inside")
    refused(run("bench", "--engine", bundle, "--random", 8, "--json", tmp_path / "b.json", "--plot", tmp_path / "b.json"),
            "the same file")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    refused(run("gate", "--arch", "resnet20", "--weights", weights, "--data", "fashion-mnist", "-o", weights),
            "which this command reads")
    profile = tmp_path / "p.json"
    profile.write_text("{}")
    refused(run("calibrate", tmp_path / "m.pt", "--data", "fashion-mnist", "--cost", profile, "-o", profile),
            "which this command reads")
    assert weights.read_bytes() == b"weights" and profile.read_text() == "{}"
    assert snapshot(bundle) == before


def test_build_never_replaces_a_folder_around_its_model(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    model = project / "model.pt"
    model.write_bytes(b"a model")
    refused(run("build", model, "-o", project, "--force"), "holds", "would delete its own input")
    refused(run("build", model, "-o", tmp_path, "--force"), "holds")
    assert model.read_bytes() == b"a model"


def test_check_output_rules(bundle, tmp_path):
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    with pytest.raises(UserError, match="lies inside the bundle"):
        check_output(bundle / "sub" / "x.json")  # into a bundle not even read
    with pytest.raises(UserError, match="which this command reads"):
        check_output(tmp_path / "." / "m.pt", reads=[model])  # the same file, spelled differently
    link = tmp_path / "link.pt"
    link.symlink_to(model)
    with pytest.raises(UserError, match="which this command reads"):
        check_output(link, reads=[model])  # a symlink to an input
    with pytest.raises(UserError, match="is a directory"):
        check_output(tmp_path)
    model.chmod(0o444)
    with pytest.raises(UserError, match="read-only"):
        check_output(model)  # replaced by a rename even so: refused, for root too
    with pytest.raises(UserError, match="read-only"):
        check_rewrite(model, "MODEL")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output(empty, folder=BUNDLE, force=True) == empty  # an empty folder may be filled
    with pytest.raises(UserError, match="--force"):
        check_output(empty, folder=BUNDLE, force=False)
    assert check_output(bundle, folder=BUNDLE, force=True) == bundle  # its own kind
    assert check_output(tmp_path / "new" / "deeper" / "out.json") == tmp_path / "new" / "deeper" / "out.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing


# ------------------------------------------------------------------------ read-only bundles and manifests


def test_calibrate_engine_refuses_a_read_only_manifest_before_loading_data(bundle, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((40, *SHAPE), np.float32), y=np.zeros(40, np.int64))
    manifest = bundle / "manifest.json"
    manifest.chmod(0o444)
    before = snapshot(bundle)
    refused(run("calibrate", "--engine", bundle, "--data", f"npz:{tmp_path / 'missing.npz'}"), "read-only")
    refused(run("calibrate", "--engine", bundle, "--data", f"npz:{data}", "--val-size", 20,
                "--guarantee", "none"), "read-only")
    assert snapshot(bundle) == before


# ------------------------------------------------------------------------ writes: atomic, umask, swaps


def test_new_outputs_honour_the_umask_and_replaced_files_keep_their_mode(bundle, tmp_path):
    want_file, want_dir = 0o666 & ~files.UMASK, 0o777 & ~files.UMASK
    out = files.write_text_atomic(tmp_path / "a" / "b.json", "{}")
    assert stat.S_IMODE(out.stat().st_mode) == want_file
    out.chmod(0o640)
    files.write_text_atomic(out, "{} ")
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # a replaced file keeps what its owner gave it
    assert stat.S_IMODE(files.temp_dir_beside(tmp_path / "x").stat().st_mode) == want_dir
    repo = tmp_path / "repo"
    assert run("triton", bundle, "-o", repo, "--platform", "python").exit_code == 0
    assert stat.S_IMODE(repo.stat().st_mode) == want_dir  # was 0700 (mkdtemp)
    assert stat.S_IMODE((repo / "README.md").stat().st_mode) == want_file
    assert stat.S_IMODE((repo / "dgate-repository.json").stat().st_mode) == want_file
    assert run("profile", bundle, "--min-seconds", 0.01, "-o", tmp_path / "p.json").exit_code == 0
    assert stat.S_IMODE((tmp_path / "p.json").stat().st_mode) == want_file


def test_score_output_honours_the_umask(bundle, tmp_path):
    pytest.importorskip("pyarrow")
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((4, *SHAPE), np.float32))
    out = tmp_path / "p.parquet"
    result = run("score", bundle, "--data", f"npz:{data}", "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~files.UMASK  # was 0600 (mkstemp)


def test_a_failed_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    """A failure between moving the old folder aside and renaming the new one into place puts the old one
    back: a reader sees the old folder or the new one, never neither, and nothing is lost."""
    out, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    real = os.rename

    def failing(src, dst):
        if Path(src) == new:  # the second rename: the new folder into place
            assert not out.exists()  # the old one is aside, not gone ...
            assert any(p.name == "previous" for p in tmp_path.rglob("previous"))  # ... and kept
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "rename", failing)
    with pytest.raises(OSError):
        files.replace_dir(new, out, force=True)
    monkeypatch.undo()
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-1", "out"]  # no old-folder left over
    files.replace_dir(new, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_concurrent_manifest_update_is_never_lost(bundle, tmp_path, monkeypatch):
    """Two calibrate --engine on one bundle: the one that finishes second read the manifest before the first
    rewrote it, and is refused instead of silently undoing the first one's thresholds."""
    from dgate_export import recalibrate as recal
    from dgate_export.calibrate import Target
    from dgate_export.data import Dataset

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, *SHAPE), dtype=np.float32)
    val = Dataset(x, rng.integers(0, 3, 60).astype(np.int64), None, None)
    scores = recal.exit_scores
    inner: list = []

    def meanwhile(rt, rows, ys=None):  # the other calibrate runs whole while this one scores its rows
        if not inner:
            inner.append(None)
            inner[0] = recal.recalibrate(bundle, val, None, target=Target(budget=0.9))
        return scores(rt, rows, ys)

    monkeypatch.setattr(recal, "exit_scores", meanwhile)
    with pytest.raises(UserError, match="changed while this command was working"):
        recal.recalibrate(bundle, val, None, target=Target(budget=0.5))
    kept = load_manifest(bundle)
    assert kept.thresholds == inner[0].calibration.thresholds  # the first update stands
    assert kept.calibration["target_options"]["budget"] == 0.9
    verify_bundle(bundle)
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_repository_marker(bundle, tmp_path):
    repo = tmp_path / "r"
    assert run("triton", bundle, "-o", repo, "--platform", "python").exit_code == 0
    marker = json.loads((repo / "dgate-repository.json").read_text())
    assert marker["format"] == "dgate-repository/1" and marker["bundle"] == "tiny" and "tiny_seg0" in marker["models"]
