"""End-to-end runs of the training loop on a tiny model and a small JSONL task."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from zotune.train.logs import TIMING_FIELDS
from zotune.train.run import replay, train

pytestmark = pytest.mark.filterwarnings("ignore")


def deterministic_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in TIMING_FIELDS})
    return out


def trained_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoint" / "state.safetensors")


@pytest.mark.parametrize(
    "estimator,overrides",
    [
        ("prge", {}),
        ("prge", {"optim.momentum": 0.9, "optim.schedule": "cosine", "adapter.kind": "lora"}),
        ("prge", {"optim.momentum": 0.9, "optim.normalize": "rms", "optim.lr": 1e-3}),
        ("rge", {}),
        ("fo", {"optim.lr": 1e-3}),
    ],
)
def test_resume_continues_exactly(tmp_path, tiny_folder, cls_jsonl, estimator, overrides):
    overrides = {"optim.estimator": estimator, **overrides}
    straight = tiny_config(tiny_folder, cls_jsonl, tmp_path / "straight", **overrides)
    train(straight)
    split = tiny_config(tiny_folder, cls_jsonl, tmp_path / "split", **overrides)
    assert train(split, stop_after=3) is None
    train(split, resume=True)
    a, b = trained_tensors(tmp_path / "straight"), trained_tensors(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for log in ("metrics.jsonl", "replay.jsonl"):
        assert deterministic_lines(tmp_path / "straight" / log) == deterministic_lines(
            tmp_path / "split" / log
        )


def test_killed_run_resumes_exactly(tmp_path, tiny_folder, cls_jsonl):
    """SIGKILL in the middle of a run (a real process), then --resume: same B as straight."""
    args = [
        "--model.name",
        tiny_folder,
        "--data.task",
        f"jsonl:{cls_jsonl}",
        "--data.train_size",
        "40",
        "--data.dev_size",
        "16",
        "--data.test_size",
        "16",
        "--data.max_length",
        "16",
        "--adapter.rank",
        "4",
        "--optim.q",
        "2",
        "--optim.batch_size",
        "2",
        "--optim.lr",
        "0.01",
        "--train.steps",
        "24",
        "--train.eval_every",
        "12",
        "--train.checkpoint_every",
        "1",
        "--train.eval_batch_size",
        "8",
        "--train.progress",
        "false",
        "--train.threads",
        "1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zotune.cli", "train", *args, "--train.out_dir", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.is_file() and sum(1 for _ in metrics.open()) > 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    done = subprocess.run(
        [sys.executable, "-m", "zotune.cli", "train", *args, "--train.out_dir", str(killed), "--resume"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    straight = tmp_path / "straight"
    subprocess.run(
        [sys.executable, "-m", "zotune.cli", "train", *args, "--train.out_dir", str(straight)],
        env=env,
        check=True,
        capture_output=True,
    )
    a, b = trained_tensors(straight), trained_tensors(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert deterministic_lines(straight / "replay.jsonl") == deterministic_lines(killed / "replay.jsonl")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"optim.momentum": 0.5, "adapter.kind": "lora"},
        {"optim.momentum": 0.9, "optim.normalize": "rms"},
        {"optim.estimator": "rge", "optim.noise": "rademacher"},
    ],
)
def test_replay_rebuilds_the_adapter_bitwise(tmp_path, tiny_folder, cls_jsonl, overrides):
    cfg = tiny_config(tiny_folder, cls_jsonl, tmp_path / "run", **overrides)
    summary = train(cfg)
    out = replay(str(tmp_path / "run" / "replay.jsonl"), str(tmp_path / "replayed"))
    rebuilt = load_file(out / "adapter_model.safetensors")
    # The adapter saved by the run is the dev-selected one; compare with the final state.
    final = trained_tensors(tmp_path / "run")
    b_keys = [k for k in final if k.startswith("param.") and k.endswith("lora_B")]
    assert b_keys and any(final[k].abs().sum() > 0 for k in b_keys)
    for key in b_keys:
        layer = key[len("param.") : -len(".lora_B")]
        assert torch.equal(rebuilt[f"base_model.model.{layer}.lora_B.weight"], final[key])
    assert summary["steps"] == 6


def test_replay_of_full_parameter_run(tmp_path, tiny_folder, cls_jsonl):
    cfg = tiny_config(
        tiny_folder,
        cls_jsonl,
        tmp_path / "run",
        **{
            "adapter.kind": "full",
            "optim.estimator": "rge",
            "optim.lr": 1e-4,
            "optim.eps": 1e-3,
            "train.steps": 3,
            "train.eval_every": 3,
            "train.checkpoint_every": 3,
        },
    )
    train(cfg)
    out = replay(str(tmp_path / "run" / "replay.jsonl"), str(tmp_path / "replayed"))
    rebuilt = load_file(out / "model.safetensors")
    final = trained_tensors(tmp_path / "run")
    assert all(
        torch.equal(rebuilt[k[len("param.") :]], v) for k, v in final.items() if k[len("param.") :] in rebuilt
    )


def test_run_outputs(tmp_path, tiny_folder, cls_jsonl):
    cfg = tiny_config(tiny_folder, cls_jsonl, tmp_path / "run")
    s = train(cfg)
    run = tmp_path / "run"
    for name in (
        "summary.json",
        "training.png",
        "config.yaml",
        "zero_shot.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["accuracy"] == s["test"]["accuracy"]
    assert 0 <= summary["selected_step"] <= 6 and summary["peak_rss_mb"] > 0
    assert "accuracy" in summary["zero_shot"]["test_calibrated"]
    kinds = [json.loads(line)["type"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 6 and kinds.count("final") == 1
    with open(run / "training.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_time_limit_stops_early_and_still_finishes(tmp_path, tiny_folder, cls_jsonl):
    cfg = tiny_config(
        tiny_folder,
        cls_jsonl,
        tmp_path / "run",
        **{"train.steps": 1000, "train.eval_every": 500, "train.time_limit_s": 1e-9},
    )
    s = train(cfg)
    recs = _records(tmp_path / "run")
    assert s["steps"] == 1 and [r["done"] for r in recs if r["type"] == "train"] == [1]
    # The stopping step is evaluated on dev and checkpointed like a last step.
    assert [r["done"] for r in recs if r["type"] == "eval" and r["split"] == "dev"] == [0, 1]
    assert json.loads((tmp_path / "run/checkpoint/meta.json").read_text())["done"] == 1
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()


def test_track_test_logs_curves_but_selects_on_dev(tmp_path, tiny_folder, cls_jsonl):
    cfg = tiny_config(tiny_folder, cls_jsonl, tmp_path / "run", **{"train.track_test": True})
    s = train(cfg)
    recs = _records(tmp_path / "run")
    track = [r for r in recs if r["type"] == "track"]
    assert [r["done"] for r in track] == [3, 6] and all(r["split"] == "test" for r in track)
    dev = {r["done"]: r["accuracy"] for r in recs if r["type"] == "eval" and r["split"] == "dev"}
    assert s["dev"]["accuracy"] == max(dev.values())
    train_recs = [r for r in recs if r["type"] == "train"]
    # "time" is training time only: evaluations are in "wall" but not in "time".
    assert all(r["time"] <= r["wall"] for r in train_recs)
