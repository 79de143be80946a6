"""Atomic writes under SIGKILL: a real writer process, killed at random moments, always leaves the
old content or the new one (files and folders), never a torn one."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zotune.io import atomic_dir, atomic_write_bytes, atomic_write_text, committed_dir

# Rewrites the target forever, alternating two contents of 2 MB (large enough that a kill
# often lands inside a write). Prints one line once the first write is done.
WRITER = r"""
import sys
from pathlib import Path
from zotune.io import atomic_dir, atomic_write_bytes

mode, target = sys.argv[1], Path(sys.argv[2])
contents = [b"A" * (2 << 20), b"B" * (2 << 20)]
i = 0
while True:
    data = contents[i % 2]
    if mode == "file":
        atomic_write_bytes(target, data)
    else:
        with atomic_dir(target) as tmp:
            (tmp / "one.bin").write_bytes(data)
            (tmp / "two.bin").write_bytes(data)
    if i == 0:
        print("ready", flush=True)
    i += 1
"""
VALID = {b"A" * (2 << 20), b"B" * (2 << 20)}


def _kill_at_random(mode: str, target: Path, rounds: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    rng = random.Random(0)
    for _ in range(rounds):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, mode, str(target)], env=env, stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0, 0.05))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        if mode == "file":
            assert target.read_bytes() in VALID
        else:
            folder = committed_dir(target)  # <target>.old if killed between the renames
            one, two = (folder / "one.bin").read_bytes(), (folder / "two.bin").read_bytes()
            assert one in VALID and one == two  # both files from the same write


@pytest.mark.parametrize("mode", ["file", "dir"])
def test_a_killed_writer_leaves_old_or_new(tmp_path, mode):
    target = tmp_path / ("target.bin" if mode == "file" else "target")
    _kill_at_random(mode, target, rounds=12)
    # Leftover temporary files are hidden names beside the target, never the target itself.
    assert all(p.name.startswith(".") or p.name.startswith("target") for p in tmp_path.iterdir())


def test_failed_writes_change_nothing(tmp_path):
    path = atomic_write_text(tmp_path / "f.txt", "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    folder = tmp_path / "d"
    with atomic_dir(folder) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError("stop")
    assert (folder / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]
    assert (path.stat().st_mode & 0o777) == 0o644


def test_orphaned_temporary_files_of_dead_writers_are_removed(tmp_path):
    from zotune.io import remove_orphans

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    orphan_file = tmp_path / f".replay.jsonl.{dead_pid}.abcd1234.tmp"
    orphan_dir = tmp_path / f".checkpoint.{dead_pid}.x_y9z8w7.tmp"
    live = tmp_path / f".summary.json.{os.getpid()}.abcd1234.tmp"  # a writer still running
    orphan_file.write_bytes(b"torn")
    (orphan_dir / "state.safetensors").parent.mkdir()
    (orphan_dir / "state.safetensors").write_bytes(b"torn")
    live.write_bytes(b"in progress")
    kept = [tmp_path / "metrics.jsonl", tmp_path / ".hidden.tmp", tmp_path / "checkpoint.old"]
    for path in kept:
        path.write_bytes(b"data")
    assert sorted(remove_orphans(tmp_path)) == sorted([orphan_file, orphan_dir])
    assert sorted(tmp_path.iterdir()) == sorted([live, *kept])
    # The atomic writers name their temporary files so: a killed one leaves an orphan it finds.
    atomic_write_text(tmp_path / "x.txt", "x")
    with atomic_dir(tmp_path / "folder") as tmp:
        assert tmp.name.startswith(f".folder.{os.getpid()}.") and tmp.name.endswith(".tmp")
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
