"""Bad task records through the command line: `zotune train` exits with status 2 and one
`zotune: error:` line naming the file, the line and the field, and writes nothing. (A choice list
of one element, a chat without an assistant turn, a completion longer than data.max_target_length
and an unknown harness task have their command-line tests beside their task kind:
tests/test_choice.py, test_chat.py, test_generate.py, test_harness.py.)"""

import json

import pytest

from zotune.cli import main


def choice(i):
    return {"prompt": f"Item {i} has the colour", "choices": [" red", " deep blue"], "answer": i % 2}


def chat(i, reply="ok"):
    return {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": reply}]}


LONG = "a reply that is far longer than the eight tokens this run allows for the assistant turn"


@pytest.mark.parametrize(
    "rows, line, field, says",
    [
        (
            [choice(i) for i in range(7)] + [{"prompt": "p", "choices": [], "answer": 0}],
            8,
            "choices",
            "got 0",
        ),
        (
            [choice(i) for i in range(4)] + [{"prompt": "p", "choices": [" a", " b"], "answer": 2}],
            5,
            "answer",
            "expected an index 0..1 into choices, got 2",
        ),
        ([{**choice(0), "answer": -1}] + [choice(i) for i in range(1, 6)], 1, "answer", "got -1"),
        ([chat(i) for i in range(5)] + [chat(5, LONG)], 6, "messages", "more than data.max_target_length=8"),
    ],
    ids=["empty-choices", "answer-out-of-range", "negative-answer", "chat-reply-too-long"],
)
def test_bad_record_exits_2_naming_file_line_field(tmp_path, tiny_folder, capsys, rows, line, field, says):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    sizes = ["--data.train_size", "2", "--data.dev_size", "2", "--data.test_size", "2"]
    args = ["train", "--model.name", tiny_folder, "--data.task", f"jsonl:{data}", *sizes]
    args += ["--data.max_length", "48", "--data.max_target_length", "8", "--train.out_dir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zotune: error:"), err
    assert f"bad.jsonl, line {line}, field '{field}'" in err[0] and says in err[0], err[0]
    assert not out.exists()
