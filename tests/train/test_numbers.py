"""Numbers are checked where they enter: a training step's lr, loss and g, and a replay log's lines."""

import json

import pytest

from conftest import tiny_config
from helpers import args_for, refused
from zotune.cli import main
from zotune.errors import ZotuneError
from zotune.train.run import train
from zotune.train.scale import StepScale

pytestmark = pytest.mark.filterwarnings("ignore")


def test_a_step_with_a_non_finite_loss_is_refused_and_not_logged(capsys, tmp_path, tiny_folder, cls_jsonl):
    run = tmp_path / "run"
    over = {"optim.lr": 1e30, "train.checkpoint_every": 1}  # step 1 is fine, its update is not
    line = refused(capsys, ["train", *args_for(tiny_folder, cls_jsonl, run, **over)])
    assert "step 2: the loss and g are not finite" in line
    steps = [json.loads(x) for x in (run / "replay.jsonl").read_text().splitlines()][1:]
    assert [s["step"] for s in steps] == [0]
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["done"] == 1


def test_a_non_finite_learning_rate_is_refused_before_the_step(tmp_path, tiny_folder, cls_jsonl, monkeypatch):
    monkeypatch.setattr(StepScale, "lr", lambda self, lr: float("inf"))
    with pytest.raises(ZotuneError, match=r"step 1: the learning rate is inf"):
        train(tiny_config(tiny_folder, cls_jsonl, tmp_path / "run"))
    assert [json.loads(x)["type"] for x in (tmp_path / "run" / "replay.jsonl").read_text().splitlines()] == [
        "header"
    ]


@pytest.fixture(scope="module")
def replay_lines(tmp_path_factory, tiny_folder, cls_jsonl) -> list[str]:
    run = tmp_path_factory.mktemp("numbers") / "run"
    train(tiny_config(tiny_folder, cls_jsonl, run, **{"train.steps": 3, "train.eval_every": 3}))
    return (run / "replay.jsonl").read_text().splitlines()


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("g", [float("nan"), 0.5], "field 'g': expected a list of finite numbers"),
        ("g", [float("inf"), 0.5], "field 'g': expected a list of finite numbers"),
        ("g", [0.5], "field 'g': expected q=2 numbers"),
        ("lr", float("-inf"), "field 'lr': expected a finite number"),
        ("seed", 1.5, "field 'seed': expected an integer"),
    ],
)
def test_replay_refuses_a_non_finite_line_naming_it(capsys, tmp_path, replay_lines, field, value, needle):
    lines = list(replay_lines)
    rec = json.loads(lines[2])  # line 3: the second step
    rec[field] = value
    lines[2] = json.dumps(rec)  # NaN and Infinity, as Python's json writes them
    log = tmp_path / "replay.jsonl"
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rebuilt"
    line = refused(capsys, ["replay", str(log), "--out", str(out)])
    assert f"{log}: line 3: {needle}" in line
    assert not out.exists()
    log.write_text("\n".join(replay_lines) + "\n")  # the log as written replays
    assert main(["replay", str(log), "--out", str(out)]) == 0
