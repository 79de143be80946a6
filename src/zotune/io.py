"""Atomic writes: a reader, or a process killed at any moment, sees the old content or the new,
never a torn file.

Files are written to a temporary file in the same folder, flushed to disk, then renamed over the
target (`os.replace` is atomic within a file system). Folders (checkpoints, adapters, converted
models) are built in a temporary folder beside the target and swapped in with two renames: the
old folder is moved aside to `<name>.old`, the new one renamed into place, the old one deleted.
Killed between the two renames, only `<name>.old` exists; `committed_dir` finds it.

Temporary files and folders are named `.<name>.<pid>.<random>.tmp`; a writer killed before its
rename leaves one behind, and `remove_orphans` deletes those of processes that no longer run
(the trainer calls it when a run starts or resumes). Finished folders are readable by everyone,
as files are, so that a cache filled by one user serves others.

`json_lines` reads JSON Lines for the readers that `errors.reading` wraps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
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
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; these are ordinary data
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o644)  # as atomic_write_bytes; some writers make 0600 files
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


def writable(folder: str | Path, why: str) -> Path:
    """`folder`, created if needed, once a file could be made in it; otherwise a ZotuneError that
    says which folder is not writable and why it must be (a cache owned by another user, a
    read-only file system)."""
    from zotune.errors import ZotuneError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ZotuneError(f"{folder} is not writable ({e.strerror or e}): {why}") from None
    return folder


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders in `folder` that writers killed before their rename
    left behind (those of processes still running are kept). -> what was deleted."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or _running(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def json_lines(path: str | Path, at) -> Iterator[tuple[int, object]]:
    """(line number, JSON value) of every non-blank line of a UTF-8 file (a leading byte-order
    mark is allowed). `at` (an `errors.Where`) follows the line being read, so that an error
    raised inside `errors.reading` names it."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            at.line = n
            text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            if text.strip():
                yield n, json.loads(text)
    at.line = None
