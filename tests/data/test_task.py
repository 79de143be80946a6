from collections import Counter

import pytest

from zotune.data.task import (
    Example,
    TaskSplits,
    dedupe,
    fill_template,
    label_words_for,
    split_examples,
    split_given,
)
from zotune.errors import DataError

CHOICES = (" positive", " negative")


def cls(n, start=0, labels=2):
    return [Example(prompt=f"p{i}", choices=CHOICES, label=i % labels) for i in range(start, start + n)]


def prompts(split):
    return {e.prompt for e in split}


def test_splits_sizes_disjoint_balanced():
    train, dev, test = split_examples(cls(400), 100, 40, 60, seed=0, source="mem")
    assert (len(train), len(dev), len(test)) == (100, 40, 60)
    assert (
        not prompts(train) & prompts(dev)
        and not prompts(train) & prompts(test)
        and not prompts(dev) & prompts(test)
    )
    assert Counter(e.label for e in train) == {0: 50, 1: 50}
    assert Counter(e.label for e in dev) == {0: 20, 1: 20}
    assert Counter(e.label for e in test) == {0: 30, 1: 30}


def test_splits_deterministic_under_seed():
    a = split_examples(cls(400), 100, 40, 60, seed=3, source="mem")
    b = split_examples(cls(400), 100, 40, 60, seed=3, source="mem")
    c = split_examples(cls(400), 100, 40, 60, seed=4, source="mem")
    assert a == b
    assert a != c


def test_balance_tops_up_from_other_labels():
    # 10 of label 1, 90 of label 0: 40 train = 10 of label 1 + 30 of label 0 once label 1 runs out
    data = [Example(f"a{i}", CHOICES, 0) for i in range(90)] + [
        Example(f"b{i}", CHOICES, 1) for i in range(10)
    ]
    train, dev, test = split_examples(data, 40, 10, 10, seed=0, source="mem")
    assert Counter(e.label for e in test) == {0: 5, 1: 5}
    assert Counter(e.label for e in dev) == {0: 5, 1: 5}
    assert Counter(e.label for e in train) == {0: 40}  # label 1 used up by test and dev


def test_train_shrinks_first():
    train, dev, test = split_examples(cls(50), 100, 10, 20, seed=0, source="mem")
    assert (len(train), len(dev), len(test)) == (20, 10, 20)


def test_empty_split_names_source():
    with pytest.raises(DataError, match=r"tiny\.jsonl.*empty train split") as e:
        split_examples(cls(25), 100, 10, 20, seed=0, source="tiny.jsonl")
    assert e.value.field == "data.train_size"
    with pytest.raises(DataError, match=r"tiny\.jsonl.*empty train and dev split"):
        split_examples(cls(20), 100, 10, 20, seed=0, source="tiny.jsonl")


def test_negative_size():
    with pytest.raises(DataError, match="data.dev_size"):
        split_examples(cls(20), 5, -1, 5, seed=0, source="mem")


def test_duplicates_never_cross_splits():
    data = cls(100) + cls(100)  # every prompt twice
    train, dev, test = split_examples(data, 60, 20, 20, seed=0, source="mem")
    all_prompts = [e.prompt for e in train + dev + test]
    assert len(all_prompts) == len(set(all_prompts)) == 100


def test_generation_dedupe_uses_target():
    # LM records have prompt "" everywhere: they are distinct by target
    data = [Example("", target=f"text {i}") for i in range(30)] + [Example("", target="text 0")]
    assert len(dedupe(data)) == 30
    train, dev, test = split_examples(data, 10, 10, 10, seed=0, source="mem")
    assert len({e.target for e in train + dev + test}) == 30


def test_split_given_drops_train_prompts_that_are_held_out():
    train = cls(100)
    test = cls(20, start=90)  # p90..p109: p90..p99 are also in train
    tr, dev, te = split_given(train, None, test, 1000, 10, 1000, seed=0, source="mem")
    assert len(te) == 20  # the evaluation split is kept whole
    assert not prompts(tr + dev) & prompts(te)
    assert len(tr) + len(dev) == 90
    assert not prompts(tr) & prompts(dev)


def test_split_given_with_dev_and_caps():
    tr, dev, te = split_given(
        cls(100), cls(50, start=100), cls(50, start=150), 10, 20, 30, seed=1, source="mem"
    )
    assert (len(tr), len(dev), len(te)) == (10, 20, 30)
    assert prompts(dev) <= {f"p{i}" for i in range(100, 150)}
    assert Counter(e.label for e in te) == {0: 15, 1: 15}


def test_split_given_empty_eval_split():
    with pytest.raises(DataError, match=r"given\.jsonl.*test split"):
        split_given(cls(10), None, [], 5, 2, 5, seed=0, source="given.jsonl")


def test_task_splits_sizes():
    s = TaskSplits("t", cls(3), cls(2), cls(1), "classification")
    assert s.sizes() == {"train": 3, "dev": 2, "test": 1}


def test_template_and_label_words():
    assert fill_template("Q: {input} {x}\nA:", "hi") == "Q: hi {x}\nA:"  # other braces left alone
    with pytest.raises(DataError, match="placeholder") as e:
        fill_template("no placeholder", "hi")
    assert e.value.field == "data.template"
    assert label_words_for(["pos", "neg"], {"pos": " good"}, "src") == (" good", " neg")
    with pytest.raises(DataError, match="label_words") as e:
        label_words_for(["pos", "neg"], {"posit": " good"}, "src")
    assert e.value.field == "data.label_words"


def test_check_labels():
    from zotune.data.task import check_labels

    check_labels(None)
    check_labels(["a", "b"])
    for bad in ([], ["a", "a"]):
        with pytest.raises(DataError, match="non-empty list of distinct labels") as e:
            check_labels(bad)
        assert e.value.field == "data.labels"
