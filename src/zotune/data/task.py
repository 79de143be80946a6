"""Examples, task splits, and the seeded train/dev/test split that every loader shares.

Splitting rules (the same for every data source):
- identical prompts are kept once (for generation: identical prompt + target), so dev and test never
  contain a train prompt;
- everything is drawn with random.Random(seed): same input and seed -> same splits;
- classification splits are balanced across labels when the data allows (1000 train = 500/500);
- when there are fewer examples than asked for, test is filled first, then dev, and train gets what is
  left (train shrinks first); a split that ends up empty is an error naming the source.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from zotune.errors import DataError

# classification: one token per choice, scored at the answer position; choice: each choice a token
# sequence, scored by its summed log-probability (data/choice.py); generation: loss on the completion
# tokens; chat: a conversation through the model's chat template, loss on the assistant turns
# (data/chat.py).
KINDS = ("classification", "generation", "choice", "chat")


@dataclass(frozen=True)
class Example:
    prompt: str  # text up to where the answer starts
    choices: tuple[str, ...] = ()  # classification: candidate label words, e.g. (" positive", " negative")
    label: int | None = None  # classification: index into choices
    target: str | None = None  # generation: completion text (chat: the last assistant turn)
    messages: tuple[tuple[str, str], ...] | None = None  # chat: (role, content) of every turn
    # (file, line) of the record, for errors found when tokenising; not part of equality
    origin: tuple[str, int | None] | None = field(default=None, compare=False)

    def where(self) -> dict:
        """file/line keyword arguments of a DataError about this example."""
        return {} if self.origin is None else {"file": self.origin[0], "line": self.origin[1]}


@dataclass
class TaskSplits:
    name: str
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    kind: str  # one of KINDS

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


# ----------------------------------------------------------------------------- helpers for loaders


def fill_template(template: str, text: str) -> str:
    # str.replace rather than str.format: templates may contain other braces (JSON, code).
    if "{input}" not in template:
        raise DataError(f"template {template!r} has no {{input}} placeholder", field="data.template")
    return template.replace("{input}", text)


def check_labels(labels: Sequence[str] | None) -> None:
    if labels is not None and (not labels or len(set(labels)) != len(labels)):
        raise DataError(
            f"expected a non-empty list of distinct labels, got {list(labels)}", field="data.labels"
        )


def label_words_for(
    labels: Sequence[str], label_words: dict[str, str] | None, source: str
) -> tuple[str, ...]:
    """Verbalizer word of each label: label_words[label], else " " + label."""
    words = label_words or {}
    unknown = [k for k in words if k not in labels]
    if unknown:
        raise DataError(
            f"{source}: label_words names labels {unknown} that the data does not have "
            f"(labels: {list(labels)})",
            field="data.label_words",
        )
    return tuple(words.get(label, " " + label) for label in labels)


# ----------------------------------------------------------------------------- splitting


def _key(ex: Example) -> tuple:
    # Classification: the prompt alone identifies an example. Generation: prompt and target (an LM file
    # has prompt "" everywhere, and one prompt may legitimately have several completions). Chat: the
    # whole conversation.
    if ex.messages is not None:
        return (ex.messages,)
    return (ex.prompt, None) if ex.choices else (ex.prompt, ex.target)


def dedupe(examples: Sequence[Example]) -> list[Example]:
    """First occurrence of each prompt (see _key), order kept."""
    seen, out = set(), []
    for ex in examples:
        k = _key(ex)
        if k not in seen:
            seen.add(k)
            out.append(ex)
    return out


def _groups(examples: Sequence[Example], rng: random.Random) -> list[list[Example]]:
    """Shuffled pools, one per label (one pool for generation)."""
    pool = list(examples)
    rng.shuffle(pool)
    by_label: dict[int | None, list[Example]] = {}
    for ex in pool:
        by_label.setdefault(ex.label, []).append(ex)
    return [by_label[k] for k in sorted(by_label, key=lambda k: -1 if k is None else k)]


def _draw(groups: list[list[Example]], n: int, rng: random.Random) -> list[Example]:
    """Take n examples round-robin over the label pools (consumes them): balanced while every pool
    lasts, topped up from the others when one runs out."""
    out: list[Example] = []
    while len(out) < n and any(groups):
        for g in groups:
            if g and len(out) < n:
                out.append(g.pop())
    rng.shuffle(out)  # round-robin order would alternate labels
    return out


def _check_sizes(sizes: dict[str, int]) -> None:
    for name, n in sizes.items():
        if n < 0:
            raise DataError(f"expected a non-negative size, got {n}", field=f"data.{name}_size")


def _check_nonempty(splits: dict[str, list[Example]], sizes: dict[str, int], source: str, have: int) -> None:
    empty = [name for name, split in splits.items() if sizes[name] > 0 and not split]
    if empty:
        got = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        raise DataError(
            f"{source}: not enough examples: empty {' and '.join(empty)} split ({have} unique "
            f"examples; asked for train {sizes['train']}, dev {sizes['dev']}, test {sizes['test']}; "
            f"got {got})",
            field=f"data.{empty[0]}_size",
        )


def split_examples(
    examples: Sequence[Example], train_size: int, dev_size: int, test_size: int, seed: int, source: str
) -> tuple[list[Example], list[Example], list[Example]]:
    """Carve disjoint train/dev/test splits out of one list of examples."""
    sizes = {"train": train_size, "dev": dev_size, "test": test_size}
    _check_sizes(sizes)
    unique = dedupe(examples)
    rng = random.Random(seed)
    groups = _groups(unique, rng)
    test = _draw(groups, test_size, rng)  # test first, then dev: train is the one that shrinks
    dev = _draw(groups, dev_size, rng)
    train = _draw(groups, train_size, rng)
    _check_nonempty({"train": train, "dev": dev, "test": test}, sizes, source, len(unique))
    return train, dev, test


def split_given(
    train: Sequence[Example],
    dev: Sequence[Example] | None,
    test: Sequence[Example],
    train_size: int,
    dev_size: int,
    test_size: int,
    seed: int,
    source: str,
) -> tuple[list[Example], list[Example], list[Example]]:
    """Splits from data that comes pre-split (MeZO style: dev carved from train when dev is None).

    Each split is drawn (seeded, balanced) down to its size; train examples whose prompt also occurs in
    dev or test are dropped from train, so evaluation sets stay as published.
    """
    sizes = {"train": train_size, "dev": dev_size, "test": test_size}
    _check_sizes(sizes)
    test_pool = dedupe(test)
    test_keys = {_key(e) for e in test_pool}
    dev_pool = None if dev is None else [e for e in dedupe(dev) if _key(e) not in test_keys]
    held_out = test_keys | {_key(e) for e in dev_pool or ()}
    train_pool = [e for e in dedupe(train) if _key(e) not in held_out]
    rng = random.Random(seed)
    test_out = _draw(_groups(test_pool, rng), test_size, rng)
    train_groups = _groups(train_pool, rng)
    dev_out = _draw(train_groups if dev_pool is None else _groups(dev_pool, rng), dev_size, rng)
    train_out = _draw(train_groups, train_size, rng)
    have = len(train_pool) + len(test_pool) + len(dev_pool or ())
    _check_nonempty({"train": train_out, "dev": dev_out, "test": test_out}, sizes, source, have)
    return train_out, dev_out, test_out
