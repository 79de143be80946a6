import hashlib
import io
import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from zotune.config import DataConfig
from zotune.data import bigbench, load_task
from zotune.data.bigbench import ARCHIVE, ROOT, archive_index, bigbench_archive, task_examples
from zotune.errors import DataError

# ----------------------------------------------------------------------------- the real archive

MULTIEMO = DataConfig(task="bigbench:multiemo", train_size=1000, dev_size=200, test_size=500, split_seed=0)


@pytest.fixture(scope="module")
def multiemo():
    return load_task(MULTIEMO)


def prompts(split):
    return {e.prompt for e in split}


@pytest.mark.slow
def test_multiemo_splits(multiemo):
    s = multiemo
    assert s.name == "bigbench:multiemo/all_sentence_en" and s.kind == "classification"
    assert s.sizes() == {"train": 1000, "dev": 200, "test": 500}
    assert not prompts(s.train) & prompts(s.dev)
    assert not prompts(s.train) & prompts(s.test)
    assert not prompts(s.dev) & prompts(s.test)
    assert len(prompts(s.train)) == 1000  # no duplicate prompts inside a split either
    assert Counter(e.label for e in s.train) == {0: 500, 1: 500}
    assert Counter(e.label for e in s.dev) == {0: 100, 1: 100}
    assert Counter(e.label for e in s.test) == {0: 250, 1: 250}
    for e in s.train + s.dev + s.test:
        assert e.choices == (" positive", " negative")
        assert e.prompt.startswith("Review: ") and e.prompt.endswith("\nSentiment (positive or negative):")


@pytest.mark.slow
def test_multiemo_deterministic_under_seed(multiemo):
    again = load_task(MULTIEMO)
    assert (again.train, again.dev, again.test) == (multiemo.train, multiemo.dev, multiemo.test)
    other = load_task(DataConfig(task="bigbench:multiemo/all_sentence_en", split_seed=1))
    assert prompts(other.test) != prompts(multiemo.test)


@pytest.mark.slow
def test_multiemo_is_cached(multiemo):
    root = bigbench.bigbench_dir()
    assert (root / (ARCHIVE + ".index.json")).is_file()
    assert (root / "tasks" / "multiemo" / "all_sentence_en" / "task.json").is_file()


@pytest.mark.slow
def test_multiemo_options():
    cfg = DataConfig(
        task="bigbench:multiemo",
        labels=["negative", "positive", "neutral"],
        label_words={"negative": " bad", "positive": " good"},
        template="{input} =>",
        max_input_chars=60,
        train_size=30,
        dev_size=9,
        test_size=9,
    )
    s = load_task(cfg)
    assert s.train[0].choices == (" bad", " good", " neutral")
    assert Counter(e.label for e in s.train) == {0: 10, 1: 10, 2: 10}
    assert all(e.prompt.endswith(" =>") and len(e.prompt) <= 60 + 3 for e in s.train + s.dev + s.test)
    with pytest.raises(DataError, match=r"labels \['happy'\] are not choices of this task") as e:
        load_task(DataConfig(task="bigbench:multiemo", labels=["happy", "positive"]))
    assert e.value.field == "data.labels"
    with pytest.raises(DataError, match=r"label_words names labels \['posit'\]") as e:
        load_task(DataConfig(task="bigbench:multiemo", label_words={"posit": " good"}))
    assert e.value.field == "data.label_words"


@pytest.mark.slow
def test_real_generation_task():
    s = load_task(DataConfig(task="bigbench:auto_categorization", train_size=100, dev_size=20, test_size=50))
    assert s.kind == "generation" and s.sizes() == {"train": 100, "dev": 20, "test": 50}
    ex = s.train[0]
    assert ex.prompt.endswith("\nAnswer:") and ex.target.startswith(" ") and not ex.choices


@pytest.mark.slow
def test_bad_task_names():
    with pytest.raises(DataError, match=r"unknown BIG-bench task 'multiemoo'; close matches: multiemo") as e:
        load_task(DataConfig(task="bigbench:multiemoo"))
    assert e.value.field == "data.task"
    with pytest.raises(
        DataError, match=r"'arithmetic' has 20 subtasks; name one, e\.g\. bigbench:arithmetic/"
    ):
        load_task(DataConfig(task="bigbench:arithmetic"))
    with pytest.raises(DataError, match="'boolean_expressions' is programmatic"):
        load_task(DataConfig(task="bigbench:boolean_expressions"))


# ------------------------------------------------------------- a toy archive (fast, no download)


def toy_archive(path):
    tasks = {
        "toy_mc/task.json": {
            "name": "toy_mc",
            "examples": [
                {"input": f"item {i}", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(20)
            ],
        },
        "parent/task.json": {"name": "parent"},
        "parent/sub_a/task.json": {
            "name": "sub_a",
            "examples": [{"input": f"q{i}", "target": [f"a{i}", "x"]} for i in range(12)],
        },
    }
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in tasks.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(ROOT + rel)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        script = tarfile.TarInfo(ROOT + "scripted/task.py")
        script.size = 0
        tar.addfile(script, io.BytesIO(b""))
    return path


@pytest.fixture
def toy_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    (tmp_path / "bigbench").mkdir()
    toy_archive(tmp_path / "bigbench" / ARCHIVE)
    return tmp_path


def small(task, **kw):
    return DataConfig(task=task, **{"train_size": 6, "dev_size": 2, "test_size": 2, **kw})


def test_toy_archive_index_and_cache(toy_cache, monkeypatch):
    s = load_task(small("bigbench:toy_mc"))
    assert s.kind == "classification" and s.train[0].choices == (" yes", " no")
    assert s.train[0].prompt.endswith("\nAnswer:")  # generic default template
    index = json.loads((toy_cache / "bigbench" / (ARCHIVE + ".index.json")).read_text())
    assert sorted(index["tasks"]) == ["parent", "parent/sub_a", "toy_mc"]
    assert index["programmatic"] == ["scripted"]
    assert (toy_cache / "bigbench" / "tasks" / "toy_mc" / "task.json").is_file()

    def no_scan(*a, **k):
        raise AssertionError("the archive was scanned again")

    monkeypatch.setattr(tarfile, "open", no_scan)
    monkeypatch.setattr(bigbench.gzip, "open", no_scan)
    assert load_task(small("bigbench:toy_mc")).train == s.train  # index and task.json from the cache


def test_toy_generation_subtask(toy_cache):
    s = load_task(small("bigbench:parent/sub_a", template="Q: {input}\nA:"))
    assert s.kind == "generation" and s.name == "bigbench:parent/sub_a"
    ex = s.train[0]
    assert ex.prompt.startswith("Q: q") and ex.target == " a" + ex.prompt[len("Q: q") : -len("\nA:")]
    with pytest.raises(DataError, match=r"'parent' has 1 subtasks; name one, e\.g\. bigbench:parent/sub_a"):
        load_task(small("bigbench:parent"))
    with pytest.raises(DataError, match="'scripted' is programmatic"):
        load_task(small("bigbench:scripted"))
    with pytest.raises(DataError, match="labels do not apply") as e:
        load_task(small("bigbench:parent/sub_a", labels=["a0"]))
    assert e.value.field == "data.labels"


def test_toy_empty_split_names_task(toy_cache):
    with pytest.raises(
        DataError, match=r"benchmark_tasks/toy_mc/task\.json: not enough examples: empty train"
    ):
        load_task(small("bigbench:toy_mc", dev_size=10, test_size=10))


def test_index_rebuilt_when_archive_changes(toy_cache):
    archive = toy_cache / "bigbench" / ARCHIVE
    archive_index(archive)
    index_path = toy_cache / "bigbench" / (ARCHIVE + ".index.json")
    index_path.write_text(json.dumps({"format": 1, "size": 1, "tasks": {}, "programmatic": []}))
    assert "toy_mc" in archive_index(archive)["tasks"]
    index_path.write_text("{broken")
    assert "toy_mc" in archive_index(archive)["tasks"]


def test_bad_task_json():
    src = "x/task.json"
    with pytest.raises(DataError, match=r"x/task\.json, field 'examples': task has no examples"):
        task_examples({"examples": []}, DataConfig(), {}, src)
    with pytest.raises(DataError, match=r"field 'examples\[1\]\.input'"):
        task_examples({"examples": [{"input": "a", "target": "b"}, {"target": "c"}]}, DataConfig(), {}, src)
    with pytest.raises(DataError, match=r"field 'examples': examples mix formats"):
        task_examples(
            {"examples": [{"input": "a", "target": "b"}, {"input": "a", "target_scores": {"b": 1}}]},
            DataConfig(),
            {},
            src,
        )
    with pytest.raises(DataError, match=r"field 'examples\[0\]\.target'"):
        task_examples({"examples": [{"input": "a", "target": []}]}, DataConfig(), {}, src)
    with pytest.raises(DataError, match=r"field 'examples\[0\]\.target_scores'"):
        task_examples({"examples": [{"input": "a", "target_scores": {}}]}, DataConfig(), {}, src)


def test_choices_follow_first_example_and_argmax():
    task = {
        "examples": [
            {"input": "a", "target_scores": {"x": 0, "y": 1}},
            {"input": "b", "target_scores": {"y": 0, "x": 1}},
            {"input": "c", "target_scores": {"p": 0.2, "q": 0.9, "r": 0.9}},
        ]
    }
    _, exs = task_examples({"examples": task["examples"][:2]}, DataConfig(), {}, "t")
    assert [(e.choices, e.label) for e in exs] == [((" x", " y"), 1), ((" x", " y"), 0)]
    _, exs = task_examples(task, DataConfig(), {}, "t")  # differing choice sets: each keeps its own order
    assert [(e.choices, e.label) for e in exs][2] == ((" p", " q", " r"), 1)


# ----------------------------------------------------------------------------- downloading


@pytest.mark.parametrize("old_pip", [False, True])
def test_download_is_atomic(tmp_path, monkeypatch, old_pip):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(bigbench, "_pip_rejects_bigbench", lambda: old_pip)
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        if f"pip=={bigbench.OLD_PIP}" in cmd:
            (
                tmp_path / "bigbench" / dest.rsplit("/", 1)[-1] / f"pip-{bigbench.OLD_PIP}-py3-none-any.whl"
            ).touch()
        else:
            assert "download" in cmd and "--no-deps" in cmd and "bigbench==1.0.0" in cmd
            toy_archive(f"{dest}/{ARCHIVE}")
            # The download is checked against the pinned sha256: pin the toy's.
            digest = hashlib.sha256(Path(f"{dest}/{ARCHIVE}").read_bytes()).hexdigest()
            monkeypatch.setattr(bigbench, "ARCHIVE_SHA256", digest)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bigbench.subprocess, "run", fake_pip)
    path = bigbench_archive()
    assert path == tmp_path / "bigbench" / ARCHIVE and path.is_file()
    assert bigbench_archive() == path  # downloaded once
    if old_pip:  # pip >= 26 refuses bigbench's metadata: the download runs an older pip from its wheel
        assert len(calls) == 2 and calls[1][1].endswith(f"pip-{bigbench.OLD_PIP}-py3-none-any.whl/pip")
    else:
        assert len(calls) == 1 and calls[0][1:3] == ["-m", "pip"]
    assert [p.name for p in (tmp_path / "bigbench").iterdir()] == [ARCHIVE]  # no temp dir left


def test_download_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(bigbench, "_pip_rejects_bigbench", lambda: False)

    def failing_pip(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        (tmp_path / "bigbench" / dest.rsplit("/", 1)[-1] / "partial").write_text("x")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for bigbench")

    monkeypatch.setattr(bigbench.subprocess, "run", failing_pip)
    with pytest.raises(DataError, match="(?s)could not download bigbench==1.0.0.*No matching distribution"):
        bigbench_archive()
    assert list((tmp_path / "bigbench").iterdir()) == []
