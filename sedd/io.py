"""Atomic file writes: readers, and a crash or a kill, see the old file or the new one, never half.

Every file this project writes for later reuse (token caches, tokenizers, checkpoints, logs) goes
through :func:`atomic_write`: the content is written to a hidden temporary file next to the
target (``.NAME.XXXX.tmp``, same filesystem, so the rename is atomic) and renamed over it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["TMP_GLOB", "atomic_write", "atomic_write_bytes"]

TMP_GLOB = ".*.tmp"  # what a writer killed mid-write leaves behind; safe to delete when no writer runs


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` to fill a temporary file, then rename it over ``path``.

    Args:
        path: the target file; its directory must exist.
        write: writes the whole content to the path it is given (``torch.save``, ``savefig``,
            ``Path.write_text``, or ``open(tmp, "wb")`` for a stream).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; caches and checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
