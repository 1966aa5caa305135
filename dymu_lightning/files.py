"""Files written whole or not at all.

A run can be killed at any moment (preemption, Ctrl-C, a full disk). Every result file is therefore
written beside its final path and renamed over it once complete, so a reader finds either the previous
version or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on a clean exit it replaces ``path``.

    The parent folder is created if needed. On an exception the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        yield temporary
        with open(temporary, "rb+") as stream:  # on disk before the rename makes it visible
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all; returns the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def check_writable_dir(folder: str | os.PathLike[str], where: str) -> Path:
    """Raise ValueError (prefixed by ``where``, e.g. ``"recipe.yaml: out_dir=runs/x"``) unless
    ``folder`` is, or can be created as, a folder this process can write in. Creates nothing: a test
    file is written into the nearest existing folder and removed at once."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{where}: {folder} is a file, not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{where}: {existing} is a file, so no folder can be created under it")
    try:
        handle, probe = tempfile.mkstemp(prefix=".dymu-write-test-", dir=existing)
    except OSError as error:
        raise ValueError(f"{where}: cannot write in {existing} ({error.strerror or error})") from None
    os.close(handle)
    os.unlink(probe)
    return folder
