"""Where the data caches live and how their entries are keyed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT_VERSION = 1  # bump to invalidate every cache written by sedd.data


def get_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``cache_dir`` if given, else ``$SEDD_CACHE``, else ``~/.cache/sedd``."""
    path = cache_dir or os.environ.get("SEDD_CACHE") or Path.home() / ".cache" / "sedd"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(obj) -> str:
    """A hex digest of a JSON-able description: equal descriptions, equal cache entries."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

