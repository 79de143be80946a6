"""Bad configs from the command line, in a real process: status 2, one `zotune: error:` line
naming the field, file or line, no traceback, and nothing written."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "yaml_bytes,overrides,needle",
    [
        (None, ["--optim.momentum", "1.5"], "optim.momentum: expected a number in [0, 1), got 1.5"),
        (None, ["--optim.lr", "nan"], "optim.lr: expected a finite number"),
        (None, ["--train.eval_every", "0"], "train.eval_every: expected a positive integer"),
        (None, ["--stop-after", "-3"], "--stop-after: expected a positive integer"),
        (b"optim:\n  lr: 0.1\n  lr: 0.2\n", [], "line 3: key 'lr' is given twice (first on line 2)"),
        (bytes(range(256)) * 4, [], "line 2: not UTF-8 text (byte 128)"),
        (b"train:\n  warmup: [1\n", [], "line 3: invalid YAML"),
    ],
)
def test_bad_config_exits_2_before_anything_loads(tmp_path, yaml_bytes, overrides, needle):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "zotune.cli", "train", "--train.out_dir", str(out), *overrides]
    if yaml_bytes is not None:
        (tmp_path / "c.yaml").write_bytes(yaml_bytes)
        args += ["--config", str(tmp_path / "c.yaml")]
        needle = f"{tmp_path / 'c.yaml'}: {needle}"
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zotune: error:") and needle in lines[0], proc.stderr
    assert proc.stdout == "" and not out.exists()
