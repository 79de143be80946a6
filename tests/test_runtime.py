"""zotune.runtime.keep_heap: glibc's heap is kept (no trimming, no mmap below 32 MB) unless the
user opts out."""

import subprocess
import sys

from zotune.runtime import keep_heap

PROBE = "from zotune.runtime import keep_heap; print(keep_heap())"


def _run(env_value):
    import os

    env = {k: v for k, v in os.environ.items() if k != "ZOTUNE_MALLOC"}
    if env_value is not None:
        env["ZOTUNE_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_keep_heap_takes_effect_on_glibc():  # CI and the dev machines run glibc
    assert _run(None) == "True"


def test_keep_heap_opt_out(monkeypatch):
    monkeypatch.setenv("ZOTUNE_MALLOC", "system")
    assert keep_heap() is False
    assert _run("system") == "False"
