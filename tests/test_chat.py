"""Instruction tuning: chat JSONL through the model's chat template, loss on the assistant turns."""

import json

import pytest

from zotune.cli import main
from zotune.config import DataConfig
from zotune.data import load_task
from zotune.data.chat import generation_prompt
from zotune.data.tokenize import encode
from zotune.errors import DataError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chats(n):
    return [
        {
            "messages": [
                {"role": "user", "content": f"Say the number {i}."},
                {"role": "assistant", "content": f"{i}"},
            ]
        }
        for i in range(n)
    ]


def test_loss_is_on_the_assistant_turns_only(tmp_path, tokenizer):
    f = write(tmp_path / "c.jsonl", [{"messages": CHAT}] + chats(9))
    s = load_task(DataConfig(task=f"jsonl:{f}", train_size=10, dev_size=0, test_size=0))
    assert s.kind == "chat"
    ex = next(e for e in s.train if len(e.messages) == 5)
    assert ex.target == "Rome." and ex.origin == (str(f), 1)
    T, L = 96, 40
    b = encode([ex], tokenizer, T, L, "chat")
    assert b.kind == "generation" and b.target_ids.shape == (1, L)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(b.input_ids[0][b.attention_mask[0] == 1]) == text
    trained = b.target_ids[0][b.target_mask[0] == 1]
    # exactly the two assistant turns, each with its end-of-turn token (the model learns to stop)
    assert tokenizer.decode(trained) == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    # the user turn between them is context, not trained
    between = tokenizer.decode(b.target_ids[0][b.target_mask[0] == 0])
    assert "And of Italy?" in between
    prompt = generation_prompt(tokenizer, ex.messages)
    assert prompt.endswith("And of Italy?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "record,field",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
            "messages[1].role",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0]"),
    ],
)
def test_bad_chats_name_file_line_field(tmp_path, record, field):
    f = write(tmp_path / "bad.jsonl", chats(4) + [record])
    with pytest.raises(DataError) as e:
        load_task(DataConfig(task=f"jsonl:{f}"))
    assert (e.value.file, e.value.line, e.value.field) == (str(f), 5, field)


def test_assistant_part_longer_than_max_target_length(tmp_path, tokenizer):
    f = write(tmp_path / "c.jsonl", [{"messages": CHAT}])
    s = load_task(DataConfig(task=f"jsonl:{f}", train_size=1, dev_size=0, test_size=0))
    with pytest.raises(DataError, match="more than data.max_target_length=8") as e:
        encode(s.train, tokenizer, 96, 8, "chat")
    assert (e.value.line, e.value.field) == (1, "messages")


def test_chat_run_from_the_command_line(tmp_path, tiny_folder, capsys):
    f = write(tmp_path / "c.jsonl", chats(40))
    args = [
        "--model.name",
        tiny_folder,
        "--data.task",
        f"jsonl:{f}",
        "--data.train_size",
        "20",
        "--data.dev_size",
        "6",
        "--data.test_size",
        "6",
        "--data.max_length",
        "48",
        "--data.max_target_length",
        "8",
        "--adapter.rank",
        "2",
        "--optim.q",
        "2",
        "--optim.batch_size",
        "2",
        "--train.steps",
        "2",
        "--train.eval_every",
        "2",
        "--train.progress",
        "false",
    ]
    out = tmp_path / "run"
    assert main(["train", *args, "--train.out_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["score"] == summary["test"]["rougeL"] and summary["test"]["loss"] > 0
    bad = write(tmp_path / "bad.jsonl", chats(39) + [{"messages": [{"role": "user", "content": "hi"}]}])
    capsys.readouterr()
    assert main(["train", *args, "--data.task", f"jsonl:{bad}", "--train.out_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "bad.jsonl, line 40, field 'messages': conversation has no assistant turn" in err[0]
    assert not (tmp_path / "b").exists()
