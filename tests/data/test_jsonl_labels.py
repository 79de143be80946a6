"""A classification file must have at least two labels to tell apart."""

import json

import pytest

from helpers import refused


@pytest.mark.parametrize("extra", [[], ["--data.labels", "pos"]])
def test_a_file_with_one_label_is_refused(capsys, tmp_path, extra):
    path = tmp_path / "one.jsonl"
    rows = [{"input": f"item {i}", "label": "pos" if i % 3 or extra else "neg"} for i in range(30)]
    if not extra:
        rows = [{**r, "label": "pos"} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = refused(capsys, ["data", "--data.task", f"jsonl:{path}", *extra])
    assert f"file {path}, field 'label': every example has label 'pos'" in line
    assert "at least two labels" in line


def test_two_labels_load(capsys, tmp_path):
    from zotune.cli import main

    path = tmp_path / "two.jsonl"
    rows = [{"input": f"item {i}", "label": "pos" if i % 2 else "neg"} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sizes = ["--data.train_size", "10", "--data.dev_size", "5", "--data.test_size", "5"]
    assert main(["data", "--data.task", f"jsonl:{path}", *sizes]) == 0
