"""Files written safely: private to their owner (folders 0700, files 0600 from creation) and atomic.

Used for whatever holds secrets or values computed from a client's private data: a deployment's
keys (``flower/certs.py``), the on-disk prefix cache (``tasks/prefix_store.py``); ``fsync_dir``
also by the run directory (``report/rundir.py``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new, renamed or appended-to file in it) survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_folder(directory: Path) -> Path:
    """``directory`` (and missing parents) readable by its owner only: 0700 (an existing one is narrowed)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o077:
        directory.chmod(0o700)
    return directory


def write_private(path: Path, data: bytes) -> None:
    """A new file that is 0600 from its creation (no moment at 0644); an old file there is replaced."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_private_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a fresh 0600 temporary file beside ``path``, fsync it, rename it over ``path``,
    fsync the folder: a reader sees the old file or the whole new one, never part of it, and
    concurrent writers of the same path each replace it whole. The temporary file is named
    ``.<name>.<pid>.<random>.tmp`` and removed when ``write`` raises."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
