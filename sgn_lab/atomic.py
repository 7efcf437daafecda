"""Atomic file writes, one home: whatever sgn-lab writes (run files, tables, figures) goes
through :func:`atomic_write`."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TEMPORARY_PATTERN = ".*.tmp"
"""Glob of the temporary files :func:`atomic_write` creates (and a killed process leaves)."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    A reader never sees a half-written file, and a failure (an exception in ``write``, a full
    disk, Ctrl-C) leaves no temporary file behind and an older file of the same name as it
    was. The file is created like any other, mode 0666 less the umask (``tempfile.mkstemp``
    would make it 0600), and synced to disk before the rename. The parent folder is created if
    missing. ``OSError`` passes through unchanged for the caller to name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
