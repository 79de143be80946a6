import json
from collections import Counter

import pytest

from zotune.config import DataConfig
from zotune.data import encode, load_task
from zotune.data.mezo import TASKS, row_example
from zotune.errors import DataError

WHERE = {"file": "rows.jsonl", "line": 1}

# One SuperGLUE/GLUE row per task (HF field names) -> (prompt, choices, label), from MeZO's templates.py.
CASES = {
    "sst2": (
        {"sentence": "a gorgeous film ", "label": 1, "idx": 0},
        "a gorgeous film It was",
        (" terrible", " great"),
        1,
    ),
    "rte": (
        {"premise": "Cats purr.", "hypothesis": "Cats make sounds.", "label": 0},
        'Cats purr.\nDoes this mean that "Cats make sounds." is true? Yes or No?\n',
        ("Yes", "No"),
        0,
    ),
    "boolq": (
        {"passage": "Water boils at 100 C.", "question": "does water boil at 100 c", "answer": True},
        "Water boils at 100 C. Does water boil at 100 c?\n",
        ("No", "Yes"),
        1,
    ),
    "cb": (
        {"premise": "It rained.", "hypothesis": "the ground is wet", "label": 2},
        'Suppose It rained. Can we infer that "the ground is wet"? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"),
        2,
    ),
    "wic": (
        {"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank loan.", "label": 0},
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\nThe river bank.\n'
        "The bank loan.\n",
        ("No", "Yes"),
        0,
    ),
    "wsc": (
        {"text": "Mark told Pete he was late.", "span1_text": "Pete", "span2_text": "He", "label": 1},
        'Mark told Pete he was late.\nIn the previous sentence, does the pronoun "he" refer to '
        "Pete? Yes or No?\n",
        ("No", "Yes"),
        1,
    ),
    "multirc": (
        {"paragraph": "Sam ate.", "question": "Who ate?", "answer": "Sam", "label": 1},
        'Sam ate.\nQuestion: Who ate?\nI found this answer "Sam". Is that correct? Yes or No?\n',
        ("No", "Yes"),
        1,
    ),
    "copa": (
        {
            "premise": "The man broke his toe.",
            "choice1": "He dropped a hammer on his foot.",
            "choice2": "I got a hole in my sock.",
            "question": "cause",
            "label": 0,
        },
        "The man broke his toe because",
        (" he dropped a hammer on his foot.", " I got a hole in my sock."),
        0,
    ),
}


@pytest.mark.parametrize("task", sorted(CASES))
def test_mezo_templates(task):
    row, prompt, choices, label = CASES[task]
    ex = row_example(task, row, WHERE)
    assert (ex.prompt, ex.choices, ex.label) == (prompt, choices, label)


def test_all_tasks_covered():
    assert set(TASKS) == set(CASES) == {"sst2", "rte", "boolq", "cb", "wic", "wsc", "multirc", "copa"}


def test_label_forms():
    rte = dict(CASES["rte"][0])
    assert row_example("rte", {**rte, "label": "not_entailment"}, WHERE).label == 1
    assert row_example("wic", {**CASES["wic"][0], "label": True}, WHERE).label == 1
    assert row_example("boolq", {**CASES["boolq"][0], "answer": False}, WHERE).label == 0
    assert row_example("copa", {**CASES["copa"][0], "question": "effect"}, WHERE).prompt.endswith("toe so")
    with pytest.raises(DataError, match=r"line 1, field 'label': unknown label -1.*unlabelled test split"):
        row_example("rte", {**rte, "label": -1}, WHERE)
    with pytest.raises(DataError, match=r"field 'label': unknown label 'maybe'"):
        row_example("rte", {**rte, "label": "maybe"}, WHERE)
    with pytest.raises(DataError, match=r"field 'question': expected 'cause' or 'effect'"):
        row_example("copa", {**CASES["copa"][0], "question": "why"}, WHERE)


def sst2_rows(n, start=0):
    return [
        {"sentence": f"movie {i} was something", "label": i % 2, "idx": i} for i in range(start, start + n)
    ]


def save_to_disk(path, splits):
    import datasets

    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(path)
    )
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def cfg(task, **kw):
    return DataConfig(task=task, **{"train_size": 20, "dev_size": 10, "test_size": 1000, **kw})


def test_datasets_on_disk(tmp_path):
    folder = save_to_disk(
        tmp_path / "sst2",
        {"train": sst2_rows(100) + sst2_rows(5, start=200), "validation": sst2_rows(30, start=200)},
    )
    s = load_task(cfg(f"mezo:sst2:{folder}"))
    assert s.name == "mezo:sst2" and s.kind == "classification"
    assert s.sizes() == {"train": 20, "dev": 10, "test": 30}  # test = the whole validation split
    test_prompts = {e.prompt for e in s.test}
    assert test_prompts == {f"movie {i} was something It was" for i in range(200, 230)}
    assert not test_prompts & {e.prompt for e in s.train + s.dev}  # train copies of validation rows dropped
    assert not {e.prompt for e in s.train} & {e.prompt for e in s.dev}
    assert Counter(e.label for e in s.train) == {0: 10, 1: 10}
    assert load_task(cfg(f"mezo:SST-2:{folder}")).test == s.test  # aliases, deterministic


def test_single_dataset_on_disk_is_carved(tmp_path):
    import datasets

    datasets.Dataset.from_list(sst2_rows(60)).save_to_disk(str(tmp_path / "one"))
    s = load_task(cfg(f"mezo:sst2:{tmp_path / 'one'}", test_size=10))
    assert s.sizes() == {"train": 20, "dev": 10, "test": 10}


def test_jsonl_folder(tmp_path):
    rows = [
        {**CASES["rte"][0], "premise": f"premise {i}.", "label": ["entailment", "not_entailment"][i % 2]}
        for i in range(40)
    ]
    write_jsonl(tmp_path / "rte" / "train.jsonl", rows[:30])
    write_jsonl(tmp_path / "rte" / "validation.jsonl", rows[30:])
    s = load_task(cfg(f"mezo:rte:{tmp_path / 'rte'}", train_size=10, dev_size=5))
    assert s.sizes() == {"train": 10, "dev": 5, "test": 10}
    assert s.test[0].choices == ("Yes", "No")


def test_copa_is_scored_as_sequences(tmp_path, tokenizer):
    rows = [{**CASES["copa"][0], "premise": f"Event {i} happened.", "label": i % 2} for i in range(20)]
    write_jsonl(tmp_path / "copa" / "train.jsonl", rows[:14])
    write_jsonl(tmp_path / "copa" / "validation.jsonl", rows[14:])
    s = load_task(cfg(f"mezo:copa:{tmp_path / 'copa'}", train_size=8, dev_size=4))
    assert s.sizes() == {"train": 8, "dev": 4, "test": 6}
    assert s.kind == "choice"
    b = encode(s.train, tokenizer, 64, 16, s.kind)
    assert b.kind == "choice" and b.input_ids.shape == (8, 2, 64) and b.target_mask.shape == (8, 2, 16)
    for i, ex in enumerate(s.train):  # each row is prompt + that choice, the choice under the mask
        for k, choice in enumerate(ex.choices):
            n = len(tokenizer(choice, add_special_tokens=False)["input_ids"])
            assert b.target_mask[i, k].sum() == n
            assert tokenizer.decode(b.target_ids[i, k, -n:]) == choice


def test_sst2_encodes(tmp_path, tokenizer):
    write_jsonl(tmp_path / "s" / "train.jsonl", sst2_rows(40))
    s = load_task(cfg(f"mezo:sst2:{tmp_path / 's'}", test_size=5))
    b = encode(s.train, tokenizer, 16, 4, s.kind)
    assert b.choice_ids.shape == (20, 2)


def test_missing_field_names_file_line_field(tmp_path):
    write_jsonl(tmp_path / "bad" / "train.jsonl", sst2_rows(3) + [{"label": 1}])
    with pytest.raises(DataError, match=r"train\.jsonl, line 4, field 'sentence': missing field"):
        load_task(cfg(f"mezo:sst2:{tmp_path / 'bad'}"))


def test_missing_field_on_disk_names_split_and_row(tmp_path):
    folder = save_to_disk(tmp_path / "d", {"train": sst2_rows(5), "validation": [{"text": "x", "label": 0}]})
    with pytest.raises(DataError, match=r"\[validation\] row 0, field 'sentence': missing field"):
        load_task(cfg(f"mezo:sst2:{folder}"))


def test_bad_folders_and_names(tmp_path):
    with pytest.raises(DataError, match=r"unknown MeZO task 'sst3'.*'sst2'") as e:
        load_task(cfg(f"mezo:sst3:{tmp_path}"))
    assert e.value.field == "data.task"
    with pytest.raises(DataError, match="expected mezo:sst2:<folder>"):
        load_task(cfg("mezo:sst2"))
    with pytest.raises(DataError, match="folder does not exist"):
        load_task(cfg(f"mezo:sst2:{tmp_path / 'nope'}"))
    with pytest.raises(DataError, match="no train split"):
        load_task(cfg(f"mezo:sst2:{tmp_path}"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset_dict.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot load as a datasets save_to_disk folder"):
        load_task(cfg(f"mezo:sst2:{tmp_path / 'bad'}"))
    write_jsonl(tmp_path / "ok" / "train.jsonl", sst2_rows(40))
    with pytest.raises(DataError, match="MeZO's prompts"):
        load_task(cfg(f"mezo:sst2:{tmp_path / 'ok'}", template="{input}"))


def test_empty_split(tmp_path):
    write_jsonl(tmp_path / "few" / "train.jsonl", sst2_rows(5))
    write_jsonl(tmp_path / "few" / "validation.jsonl", sst2_rows(5, start=10))
    with pytest.raises(DataError, match=r"few: not enough examples: empty train split"):
        load_task(cfg(f"mezo:sst2:{tmp_path / 'few'}", dev_size=10))
