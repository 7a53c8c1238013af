"""Outputs: the one owner of "may this command write there?" (standard library only, no numpy, no torch).

Every command that writes calls `check_output` for each output before any work (before data is loaded,
before a model is trained or a bundle measured), so a refusal costs nothing and leaves nothing behind:

- the destination must be creatable: the nearest existing folder on its path accepts a new entry (tried
  with a temporary file, which holds for root too, where permission bits say nothing), and an existing
  file there is not read-only;
- never over, into or around what the command reads (an output equal to an input, inside an input folder,
  or a folder output that would hold an input), and never into a bundle or a model repository at all (a
  bundle's manifest lists its files; only `calibrate --engine` rewrites one, through `check_rewrite`);
- an existing output is replaced only with `force` (commands without --force pass None: a file of theirs
  is overwritten, as before; a folder never), and a folder output only when it is the command's own kind
  of output (`BUNDLE`, `REPOSITORY`: recognised by their marker file) or empty; the refusal names what it
  found.

The writes themselves are atomic and honour the umask (files.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .manifest import FORMAT as BUNDLE_FORMAT
from .manifest import MANIFEST_FILE


@dataclass(frozen=True)
class OutputKind:
    """A kind of folder a command writes, recognised by its marker file (JSON with a "format" field)."""

    name: str  # "bundle", "Triton model repository"
    marker: str  # the file that marks it
    format_prefix: str  # what the marker's "format" starts with

    def found_in(self, folder: Path) -> bool:
        """Is `folder` one of these (its marker file is there, with this kind's format)?"""
        path = folder / self.marker
        try:
            if not path.is_file() or path.stat().st_size > 1 << 24:
                return False
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(data, dict) and str(data.get("format", "")).startswith(self.format_prefix)


BUNDLE = OutputKind("bundle", MANIFEST_FILE, BUNDLE_FORMAT.split("/")[0] + "/")
REPOSITORY_FORMAT = "dgate-repository/1"
REPOSITORY = OutputKind("Triton model repository", "dgate-repository.json", "dgate-repository/")
KINDS = (BUNDLE, REPOSITORY)


def kind_of(folder: Path) -> OutputKind | None:
    """The kind of output `folder` is (a bundle, a repository), or None."""
    return next((k for k in KINDS if k.found_in(folder)), None)


def check_output(target: str | os.PathLike, *, flag: str = "-o", folder: OutputKind | None = None,
                 force: bool | None = None, reads: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse (UserError) an output that must not or cannot be written; return it as a Path.

    `folder`: the kind of folder the command writes there (None: a file). `force`: the command's
    --force (None: it has none, and overwrites a file of its own as before). `reads`: what the command
    reads (bundles, models, data files, profiles; None entries are skipped). A folder output is never
    replaced without --force (force None: the command has none, e.g. serve --repo)."""
    path = Path(target)
    resolved = _resolve(path)
    what = folder.name if folder is not None else "file"
    for source in reads:
        if source is None:
            continue
        src = _resolve(Path(source))
        if resolved == src:
            raise UserError(f"{flag} {path} is {source}, which this command reads: writing it would destroy its "
                            "own input.", f"Choose another {flag}.")
        if src in resolved.parents:
            raise UserError(f"{flag} {path} lies inside {source}, which this command reads: writing there would "
                            "change its own input.", f"Choose an {flag} outside {source}.")
        if folder is not None and resolved in src.parents:
            raise UserError(f"{flag} {path} holds {source}, which this command reads: replacing the folder "
                            "would delete its own input.", f"Choose an {flag} that does not contain {source}.")
    for parent in resolved.parents:
        kind = kind_of(parent) if parent.is_dir() else None
        if kind is not None:
            raise UserError(f"{flag} {path} lies inside the {kind.name} {parent} (its {kind.marker} lists what it "
                            f"holds): a {what} written there would change it.",
                            f"Choose an {flag} outside {parent}.")
    if path.exists() or path.is_symlink():
        if folder is None:
            _check_existing_file(path, flag, force)
        else:
            _check_existing_folder(path, flag, folder, force)
    _check_creatable(path, flag)
    return path


def check_rewrite(path: str | os.PathLike, flag: str) -> Path:
    """Refuse (UserError) an in-place rewrite of the existing file `path` (calibrate --engine's manifest,
    calibrate's MODEL) that cannot be done: a read-only file, or a folder that takes no new file (the
    rewrite is a temporary file renamed over it)."""
    path = Path(path)
    if path.is_file() and _read_only(path):
        raise UserError(f"{flag} {path} is read-only, so it is not rewritten.",
                        "Make it writable (chmod u+w) if it should change, or write a copy elsewhere.")
    _check_creatable(path, flag)
    return path


def _resolve(path: Path) -> Path:
    return Path(os.path.realpath(path))  # symlinks of existing parts followed, missing parts kept


def _read_only(path: Path) -> bool:
    """No write permission bit at all: the owner asked for it not to change (root included)."""
    try:
        return not path.stat().st_mode & 0o222
    except OSError:
        return False


def _check_existing_file(path: Path, flag: str, force: bool | None) -> None:
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory.", f"Give the file to write, e.g. {flag} {path / 'out'}.")
    if force is False:
        raise UserError(f"{flag} {path} exists.", "Pass --force to replace it (only once the new one is complete).")
    if _read_only(path):
        raise UserError(f"{flag} {path} exists and is read-only, so it is not replaced.",
                        "Make it writable (chmod u+w) if it should be replaced, or choose another path.")


def _check_existing_folder(path: Path, flag: str, kind: OutputKind, force: bool | None) -> None:
    if not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a directory.", f"Choose another {flag} path.")
    if force is None:
        raise UserError(f"{flag} {path} already exists; a fresh {kind.name} is written there.",
                        f"Choose another {flag}, or remove that folder yourself.")
    if not force:
        raise UserError(f"{flag} {path} already exists.",
                        f"Pass --force to replace it (only once the new {kind.name} is complete), or choose "
                        f"another {flag}.")
    entries = sorted(p.name for p in path.iterdir())
    if not entries or kind.found_in(path):
        return
    other = kind_of(path)
    found = (f"it is a {other.name}" if other is not None else
             f"it holds {', '.join(entries[:5])}{', …' if len(entries) > 5 else ''} and no {kind.marker}")
    raise UserError(f"{flag} {path} is not a {kind.name} ({found}); --force only replaces a {kind.name}, never "
                    "a folder that merely is in the way.", f"Choose another {flag}, or empty that folder yourself.")


def _check_creatable(target: Path, flag: str) -> None:
    """The nearest existing folder on the path must accept a new entry; missing folders in between are
    created later by the writer."""
    folder = target.parent
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {target} cannot be written: {folder} is a file, not a folder.",
                        "Choose another output path.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dgate-export-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{flag} {target} cannot be written: the folder {folder} does not accept new files "
                        f"({err.strerror or err}).",
                        "Choose a folder you can write to, or fix its permissions.") from err


def check_writable(target: str | os.PathLike, flag: str = "-o") -> None:
    """Raise a UserError unless a file or folder `target` can be created (the writability part of
    check_output alone)."""
    _check_creatable(Path(target), flag)
