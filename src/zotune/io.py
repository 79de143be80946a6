"""Atomic writes: a reader, or a process killed at any moment, sees the old content or the new,
never a torn file.

Files are written to a temporary file in the same folder, flushed to disk, then renamed over the
target (`os.replace` is atomic within a file system). Folders (checkpoints, adapters, converted
models) are built in a temporary folder beside the target and swapped in with two renames: the
old folder is moved aside to `<name>.old`, the new one renamed into place, the old one deleted.
Killed between the two renames, only `<name>.old` exists; `committed_dir` finds it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; these are ordinary data
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yields an empty temporary folder; when the block ends without an exception, that folder
    replaces `path` (which may exist). On an exception nothing changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = _old(path)
        if path.exists():
            if old.exists():  # a swap killed after its first rename: path is the newer copy
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def committed_dir(path: str | Path) -> Path:
    """The folder `atomic_dir` last completed: `path`, or `<path>.old` when a swap was killed
    between its two renames."""
    path = Path(path)
    if not path.exists() and _old(path).exists():
        return _old(path)
    return path
