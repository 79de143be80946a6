"""The runnable examples under examples/, executed as a user would run them (tiny models)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"own_loop.py": ["--dtype", "bfloat16", "--accumulate", "2"], "peft_model.py": []}


def test_examples_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    procs = {
        script: subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / script), "--steps", "12", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for script, args in RUNS.items()
    }  # both at once: most of their time is imports
    try:
        outs = {script: p.communicate(timeout=300) for script, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for script, (stdout, stderr) in outs.items():
        assert procs[script].returncode == 0, stderr[-2000:]
        out = json.loads(stdout.strip().splitlines()[-1])
        assert out["steps"] == 12 and out["loss_after"] < out["loss_before"], (script, out)
        if script == "peft_model.py":
            assert out["reload_max_abs_diff"] == 0.0  # PEFT reloads what zotune trained
        else:
            assert out["fp32_master"]  # the bf16 model trained an fp32 copy of B
