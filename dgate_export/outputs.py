"""Outputs: refuse, before any work, a destination that cannot be written (numpy-free, torch-free)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


def check_writable(target: str | os.PathLike, flag: str = "-o") -> None:
    """Raise a UserError unless a file or folder `target` can be created: the nearest existing folder
    on its path must accept a new entry (tried with a temporary file, which works for root too, where
    permission bits say nothing). Missing folders in between are created later by the writer."""
    target = Path(target)
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
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
