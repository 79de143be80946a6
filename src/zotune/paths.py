"""Where zotune caches converted models and downloaded data (movable with ZOTUNE_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path

from zotune.io import writable


def cache_dir() -> Path:
    root = os.environ.get("ZOTUNE_CACHE") or Path.home() / ".cache" / "zotune"
    path = Path(root)
    if path.is_dir():  # a cache filled by another user may be read-only: reading it needs no write
        return path
    return writable(path, "zotune keeps converted models and downloaded data there; set ZOTUNE_CACHE")
