"""Where zotune caches converted models and downloaded data (movable with ZOTUNE_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("ZOTUNE_CACHE") or Path.home() / ".cache" / "zotune"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
