"""lm-evaluation-harness in-process on a zotune adapter, on a task defined by a local YAML over a
local JSONL: its accuracy equals zotune's own choice evaluation of the same examples."""

import json

import pytest
import torch

from helpers import randomize
from zotune.adapters.lora import LoRAAdapter
from zotune.adapters.peft_io import save_peft
from zotune.cli import main
from zotune.data.task import Example
from zotune.data.tokenize import encode
from zotune.loss import batch_tensors, make_loss
from zotune.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore")


def test_harness_matches_zotunes_choice_accuracy(tmp_path, tiny_folder, tokenizer, capsys):
    model, _, _ = load_model(tiny_folder)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    randomize(adapter.tensors(), std=0.3)
    folder = save_peft(tmp_path / "adapter", adapter.state(), list(adapter.layers), 4, 8.0, tiny_folder)
    rows = [json.loads(x) for x in open("examples/harness/tiny_mc.jsonl")]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = open("examples/harness/zotune_tiny_mc.yaml").read()
    yaml = yaml.replace("examples/harness/tiny_mc.jsonl", str(data))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "zotune_tiny_mc.yaml").write_text(yaml)
    assert (
        main(
            [
                "eval",
                "--model.name",
                tiny_folder,
                "--adapter",
                str(folder),
                "--harness",
                "zotune_tiny_mc",
                "--harness-include",
                str(tmp_path / "tasks"),
                "--train.eval_batch_size",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    acc = json.loads(out[out.index("{") :])["zotune_tiny_mc"]["acc,none"]
    # zotune's own choice scoring of the same rows; lm-eval joins context and choice with a space
    exs = [Example(r["prompt"], tuple(" " + c for c in r["choices"]), r["answer"]) for r in rows]
    batch = encode(exs, tokenizer, 24, 8, "choice")
    with torch.no_grad():
        scores = make_loss("choice").scores(model, *batch_tensors(batch, "choice")[:5])  # [n, 2]
    ours = {"accuracy": float((scores.argmax(-1) == batch.labels).float().mean())}
    assert acc == pytest.approx(ours["accuracy"]) and 0 < acc < 1


def test_unknown_harness_task_exits_2(tmp_path, tiny_folder, capsys):
    assert main(["eval", "--model.name", tiny_folder, "--harness", "no_such_task_xyz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task 'no_such_task_xyz' does not exist" in err[0]
