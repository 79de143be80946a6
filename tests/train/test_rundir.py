"""The run folder as a contract, from the command line: refused before anything loads, never
silently replaced or mixed, and a damaged zero_shot.json recovered on --resume."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import args_for, refused
from zotune.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_out_dir_that_cannot_hold_a_run_is_refused_before_the_model_loads(capsys, tmp_path, cls_jsonl):
    no_model = str(tmp_path / "no-model")  # reaching the model would give another error
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    line = refused(capsys, ["train", *args_for(no_model, cls_jsonl, a_file)])
    assert f"train.out_dir {a_file} is a file" in line
    line = refused(capsys, ["train", *args_for(no_model, cls_jsonl, a_file / "run")])
    assert f"{a_file} is a file, not a folder" in line
    assert a_file.read_text() == "keep"
    if os.geteuid() == 0:  # root writes anywhere a file system lets it; /proc takes no folders
        locked = Path("/proc")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
    line = refused(capsys, ["train", *args_for(no_model, cls_jsonl, locked / "run")])
    assert f"cannot write in {locked}" in line
    assert not (locked / "run").exists()
    empty = tmp_path / "empty"
    line = refused(capsys, ["train", "--resume", *args_for(no_model, cls_jsonl, empty)])
    assert "holds no checkpoint" in line and not empty.exists()
    for bad in (["--stop-after", "-1"], ["--stop-after", "0"]):
        line = refused(capsys, ["train", *bad, *args_for(no_model, cls_jsonl, empty)])
        assert "--stop-after: expected a positive integer" in line
    line = refused(capsys, ["train", "--stop-after", "x", *args_for(no_model, cls_jsonl, empty)])
    assert "--stop-after: invalid int value" in line
    assert not empty.exists()


def test_resume_refuses_a_changed_trajectory_and_allows_the_rest(capsys, tmp_path, tiny_folder, cls_jsonl):
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert main(["train", "--stop-after", "3", *args_for(tiny_folder, cls_jsonl, run)]) == 0
    before = snapshot(run)
    line = refused(
        capsys,
        ["train", "--resume", *args_for(tiny_folder, cls_jsonl, run, **{"optim.q": 3, "adapter.rank": 8})],
    )
    assert "optim.q: run has 2, now 3" in line and "adapter.rank: run has 4, now 8" in line
    over = {"optim.schedule": "cosine", "train.steps": 8, "optim.eps": 0.02, "train.seed": 1}
    line = refused(capsys, ["train", "--resume", *args_for(tiny_folder, cls_jsonl, run, **over)])
    for key in ("optim.schedule", "train.steps", "optim.eps", "train.seed"):
        assert f"{key}: run has" in line
    assert snapshot(run) == before  # nothing written by a refused resume
    # Threads, progress, logging, time limits, checkpoint interval, eval batch size may change.
    free = {
        "train.threads": 1,
        "train.progress": "true",
        "train.eval_batch_size": 5,
        "train.log_every": 2,
        "train.checkpoint_every": 1,
        "train.time_limit_s": 1000,
    }
    assert main(["train", "--resume", *args_for(tiny_folder, cls_jsonl, run, **free)]) == 0
    assert main(["train", *args_for(tiny_folder, cls_jsonl, straight)]) == 0
    a = load_file(run / "checkpoint" / "state.safetensors")
    b = load_file(straight / "checkpoint" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Under a constant schedule more steps continue the same trajectory.
    more = {**free, "train.steps": 8}
    assert main(["train", "--resume", *args_for(tiny_folder, cls_jsonl, run, **more)]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_a_run_folder_is_replaced_only_with_overwrite(capsys, tmp_path, tiny_folder, cls_jsonl):
    run = tmp_path / "run"
    args = args_for(tiny_folder, cls_jsonl, run, **{"train.steps": 2, "train.eval_every": 2})
    assert main(["train", *args]) == 0
    before = snapshot(run)
    line = refused(capsys, ["train", *args])
    assert f"train.out_dir {run} is not empty (it holds a finished run)" in line and "--overwrite" in line
    line = refused(capsys, ["train", "--resume", "--overwrite", *args])
    assert "pick one" in line
    assert snapshot(run) == before
    (run / "unrelated.txt").write_text("mine")
    faster = args_for(tiny_folder, cls_jsonl, run, **{"train.steps": 1, "train.eval_every": 1})
    assert main(["train", "--overwrite", *faster]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and (run / "unrelated.txt").read_text() == "mine"
    replay = (run / "replay.jsonl").read_text().splitlines()
    assert [json.loads(x)["type"] for x in replay] == ["header", "step"]


@pytest.mark.parametrize("damage", [lambda t: t[: len(t) // 2], lambda t: "\x00\x9f garbage", lambda t: "[]"])
def test_resume_with_a_damaged_zero_shot_file_measures_it_again(tmp_path, tiny_folder, cls_jsonl, damage):
    run = tmp_path / "run"
    args = args_for(tiny_folder, cls_jsonl, run, **{"train.steps": 2, "train.eval_every": 2})
    assert main(["train", *args]) == 0
    zero_shot = (run / "zero_shot.json").read_text()
    metrics = (run / "metrics.jsonl").read_text()
    (run / "zero_shot.json").write_text(damage(zero_shot))
    assert main(["train", "--resume", *args]) == 0
    assert json.loads((run / "zero_shot.json").read_text()) == json.loads(zero_shot)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records].count("final") == 1
    old = [json.loads(x) for x in metrics.splitlines()]
    assert [r for r in records if r["type"] != "train"] == [r for r in old if r["type"] != "train"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["zero_shot"] == json.loads(zero_shot)
