"""Files written whole or not at all.

A run can be killed at any moment (preemption, Ctrl-C, a full disk). Every result file is therefore
written beside its final path and renamed over it once complete, so a reader finds either the previous
version or the new one, never half of one. Folders (a model, a set of images) are built beside their
final path and renamed into place the same way.
"""

from __future__ import annotations

import os
import shutil
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


def make_staging_dir(target: Path) -> Path:
    """A fresh directory next to ``target`` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    # mkdtemp creates it private (0700); the cache may be shared, so use ordinary permissions.
    staging.chmod(0o755)
    return staging


def install_dir_atomically(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` directory to ``target`` (replacing it if it exists).

    ``os.replace`` cannot overwrite a non-empty directory, so an existing target is first renamed
    aside and deleted only after the new one is in place.
    """
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        # Another process installed its own copy in the meantime; keep theirs, drop ours.
        if not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
