"""The BIG-bench sdist is pinned by its sha256: the cached archive matches it, and a download or
cached file that does not is refused and never used."""

from pathlib import Path

import pytest

from zotune.data import bigbench
from zotune.errors import DataError


def test_the_cached_archive_is_the_pinned_sdist():
    bigbench.check_archive(bigbench.bigbench_archive())


def test_an_altered_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(bigbench, "bigbench_dir", lambda: tmp_path)
    downloads = []

    def fake_pip(cmd, what):  # "downloads" an archive with other bytes
        if what.startswith("bigbench"):
            folder = Path(cmd[cmd.index("-d") + 1])
            (folder / bigbench.ARCHIVE).write_bytes(b"not the sdist")
            downloads.append(folder)

    monkeypatch.setattr(bigbench, "_run", fake_pip)
    monkeypatch.setattr(bigbench, "_pip_rejects_bigbench", lambda: False)
    with pytest.raises(DataError, match=f"sha256 .*expected {bigbench.ARCHIVE_SHA256}"):
        bigbench.bigbench_archive()
    assert downloads and not any(tmp_path.iterdir())  # nothing left behind
    (tmp_path / bigbench.ARCHIVE).write_bytes(b"a cached copy gone wrong")
    with pytest.raises(DataError, match="delete it and run `zotune fetch` again"):
        bigbench.bigbench_archive(verify=True)
