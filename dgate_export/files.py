"""File helpers shared by every writer: atomic writes (temp file beside the target, then rename, so a
reader never sees a half-written file; new files and folders get what a plain open or mkdir gives under
the umask, a replaced file keeps its mode), folder swaps, and the sha256 of a file. Standard library only.
What may be written where is outputs.py's to decide."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import
    os.umask(mask)
    return mask


UMASK = _read_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *,
                 expect_sha256: str | None = None) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path` (parents created).
    On any failure the temporary file is removed and `path` is left as it was.

    `expect_sha256`: the sha256 `path` had when the caller read it. The rename then happens only if the
    file still has it, checked under an exclusive lock on the file (fcntl), so of two writers that read
    the same version the second is refused (a UserError) instead of silently undoing the first's update."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600 files
        if expect_sha256 is None:
            os.replace(tmp, path)
        else:
            _replace_if_unchanged(tmp, path, expect_sha256)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else what a plain open gives under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~UMASK


def _replace_if_unchanged(tmp: Path, path: Path, expect_sha256: str) -> None:
    import fcntl

    try:
        held = open(path, "rb")  # noqa: SIM115 (closed below, after the rename)
    except FileNotFoundError:
        held = None
    try:
        if held is not None:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a second writer waits here until the first has renamed
        now = sha256_file(path) if path.exists() else None  # the path's file now, not the one we hold
        if now != expect_sha256:
            raise UserError(f"{path} changed while this command was working (another process rewrote it, e.g. a "
                            "second `calibrate --engine` on the same bundle): it was not overwritten, so that "
                            "update is kept.", "Run the command again on the current file.")
        os.replace(tmp, path)
    finally:
        if held is not None:
            held.close()


def write_text_atomic(path: str | os.PathLike, text: str, *, expect_sha256: str | None = None) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), expect_sha256=expect_sha256)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temp_dir_beside(out: Path) -> Path:
    """A new empty folder next to `out` (parents created), to be renamed to `out` by replace_dir; it gets
    what a plain mkdir gives under the umask (mkdtemp makes 0700 folders)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~UMASK)
    return tmp


def replace_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder `tmp` to `out` (a sibling). An existing `out` is replaced only with
    `force`, and put back if the rename fails, so a reader sees the old folder or the new one."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not force:  # appeared while we were writing
        raise UserError(f"The output directory {out} appeared while it was being written.",
                        "Pass --force or choose another -o.")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "previous")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "previous", out)  # put the previous folder back
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
