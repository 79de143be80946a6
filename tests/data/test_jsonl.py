import json
from collections import Counter

import pytest

from zotune.config import DataConfig
from zotune.data import load_task
from zotune.data.jsonl import jsonl_examples, read_jsonl
from zotune.errors import DataError


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cfg(task, **kw):
    kw = {"train_size": 20, "dev_size": 5, "test_size": 5, **kw}
    return DataConfig(task=task, **kw)


def reviews(n, labels=("pos", "neg")):
    return [{"input": f"review {i}", "label": labels[i % len(labels)]} for i in range(n)]


def test_classification_file(tmp_path):
    f = write(tmp_path / "c.jsonl", reviews(40))
    s = load_task(cfg(f"jsonl:{f}", template="Review: {input}\nSentiment:"))
    assert s.kind == "classification" and s.sizes() == {"train": 20, "dev": 5, "test": 5}
    ex = s.train[0]
    assert ex.choices == (" pos", " neg")  # default label word: " " + label, order of first appearance
    assert ex.prompt.startswith("Review: review ") and ex.prompt.endswith("\nSentiment:")
    assert Counter(e.label for e in s.train) == {0: 10, 1: 10}
    assert s.name == f"jsonl:{f}"


def test_label_words_labels_filter_and_int_labels(tmp_path):
    f = write(tmp_path / "c.jsonl", reviews(60, labels=("pos", "neg", "mixed")))
    s = load_task(cfg(f"jsonl:{f}", labels=["neg", "pos"], label_words={"pos": " good", "neg": " bad"}))
    assert s.train[0].choices == (" bad", " good")
    assert all("mixed" not in e.prompt for e in s.train)  # mixed reviews dropped
    assert sum(s.sizes().values()) == 30
    g = write(tmp_path / "i.jsonl", [{"input": f"x{i}", "label": i % 2} for i in range(40)])
    s = load_task(cfg(f"jsonl:{g}", label_words={"0": " no", "1": " yes"}))
    assert s.test[0].choices == (" no", " yes")


def test_text_and_prompt_files(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"text": f"line {i} of text"} for i in range(40)])
    s = load_task(cfg(f"jsonl:{f}"))
    assert s.kind == "generation" and s.train[0].prompt == "" and s.train[0].target.startswith("line ")
    g = write(tmp_path / "p.jsonl", [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(40)])
    s = load_task(cfg(f"jsonl:{g}", template="Question {input}"))
    ex = s.dev[0]
    assert ex.prompt.startswith("Question Q") and ex.target == " A" + ex.prompt[len("Question Q") : -1]


def test_three_files(tmp_path):
    tr = write(tmp_path / "train.jsonl", reviews(50))
    dv = write(
        tmp_path / "dev.jsonl", [{"input": f"dev {i}", "label": "neg" if i % 2 else "pos"} for i in range(8)]
    )
    te = write(
        tmp_path / "test.jsonl",
        [{"input": f"test {i}", "label": "pos"} for i in range(6)] + [{"input": "review 0", "label": "pos"}],
    )  # also in train: dropped from train
    s = load_task(cfg(f"jsonl:{tr},{dv},{te}", train_size=100, dev_size=100, test_size=100))
    assert s.sizes() == {"train": 49, "dev": 8, "test": 7}
    assert {e.prompt for e in s.dev} == {f"dev {i}" for i in range(8)}
    assert "review 0" not in {e.prompt for e in s.train}
    assert s.train[0].choices == s.test[0].choices == (" pos", " neg")


def test_malformed_json_line(tmp_path):
    f = write(tmp_path / "bad.jsonl", [{"text": "ok"}, '{"text": "unterminated'])
    with pytest.raises(DataError, match=r"file .*bad\.jsonl, line 2: malformed JSON") as e:
        read_jsonl(f)
    assert e.value.line == 2 and e.value.file == str(f)


def test_not_an_object(tmp_path):
    f = write(tmp_path / "list.jsonl", [{"text": "ok"}, "", "[1, 2]"])
    with pytest.raises(DataError, match=r"line 3: expected a JSON object, got list"):
        read_jsonl(f)


def test_missing_field(tmp_path):
    f = write(tmp_path / "m.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match=r"m\.jsonl, line 2, field 'completion': missing field") as e:
        load_task(cfg(f"jsonl:{f}"))
    assert (e.value.line, e.value.field) == (2, "completion")


def test_wrong_type(tmp_path):
    f = write(tmp_path / "w.jsonl", [{"input": "a", "label": "pos"}, {"input": 5, "label": "neg"}])
    with pytest.raises(DataError, match=r"w\.jsonl, line 2, field 'input': expected str, got int"):
        load_task(cfg(f"jsonl:{f}"))
    g = write(tmp_path / "b.jsonl", [{"input": "a", "label": True}])
    with pytest.raises(DataError, match=r"line 1, field 'label': expected str or int, got bool"):
        load_task(cfg(f"jsonl:{g}"))


def test_unknown_label(tmp_path):
    f = write(tmp_path / "u.jsonl", reviews(10) + [{"input": "odd", "label": "meh"}])
    with pytest.raises(DataError, match=r"u\.jsonl, line 11, field 'label': unknown label 'meh'") as e:
        load_task(cfg(f"jsonl:{f}", label_words={"pos": " good", "neg": " bad"}))
    assert e.value.field == "label"


def test_label_words_for_missing_label(tmp_path):
    f = write(tmp_path / "c.jsonl", reviews(10))
    with pytest.raises(DataError, match="no entry in data.label_words") as e:
        load_task(cfg(f"jsonl:{f}", labels=["pos", "neg"], label_words={"pos": " good"}))
    assert e.value.field == "data.labels"


def test_empty_labels_list(tmp_path):
    f = write(tmp_path / "c.jsonl", reviews(10))
    with pytest.raises(DataError, match="non-empty list of distinct labels") as e:
        load_task(cfg(f"jsonl:{f}", labels=[]))
    assert e.value.field == "data.labels"


def test_empty_file_and_missing_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        load_task(cfg(f"jsonl:{f}"))
    with pytest.raises(DataError, match=r"nope\.jsonl: file does not exist"):
        load_task(cfg(f"jsonl:{tmp_path / 'nope.jsonl'}"))


def test_empty_split(tmp_path):
    f = write(tmp_path / "few.jsonl", reviews(8))
    with pytest.raises(DataError, match=r"few\.jsonl: not enough examples: empty train split") as e:
        load_task(cfg(f"jsonl:{f}"))
    assert e.value.field == "data.train_size"


def test_unknown_format_and_mixed_files(tmp_path):
    f = write(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"x\.jsonl, line 1: unknown record format"):
        load_task(cfg(f"jsonl:{f}"))
    a = write(tmp_path / "a.jsonl", reviews(10))
    b = write(tmp_path / "b.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"b\.jsonl: records are in the 'text' format"):
        jsonl_examples([a, b, a], DataConfig())


def test_labels_on_generation_file(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="labels apply to classification") as e:
        load_task(cfg(f"jsonl:{f}", labels=["a"]))
    assert e.value.field == "data.labels"


def test_bad_task_specs(tmp_path):
    with pytest.raises(DataError, match=r"expected jsonl:<file> or jsonl:<train>,<dev>,<test>") as e:
        load_task(cfg("jsonl:a.jsonl,b.jsonl"))
    assert e.value.field == "data.task"
    with pytest.raises(DataError, match=r"unknown task scheme 'csv'") as e:
        load_task(cfg("csv:data.csv"))
    assert e.value.field == "data.task"
    with pytest.raises(DataError, match="names no task") as e:
        load_task(cfg("jsonl:"))
    assert e.value.field == "data.task"
