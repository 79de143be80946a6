"""JSONL files, one JSON object per line, in one of five formats (the first record decides):

    {"text": ...}                      language modelling on the whole text (prompt "", target text)
    {"prompt": ..., "completion": ...} generation
    {"input": ..., "label": ...}       classification; label word = data.label_words[label], else " " + label
    {"prompt": ..., "choices": [...], "answer": i}
                                       multiple choice; each choice is appended to the prompt verbatim
                                       (start it with a space where one belongs) and scored as a sequence
    {"messages": [{"role", "content"}, ...]}
                                       a conversation, rendered by the model's chat template (data/chat.py)

A completion (or choice, or the assistant part of a chat) longer than data.max_target_length tokens is
an error naming its line; {"text"} records are cut to that length instead, as language modelling on
long texts expects.

data.template (with {input}) is applied to `input` and `prompt`. data.labels keeps only the listed
labels (and fixes the order of the choices). Any bad line is an error naming file, line and field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from zotune.config import DataConfig
from zotune.data.chat import chat_example
from zotune.data.choice import check_choices
from zotune.data.task import (
    Example,
    TaskSplits,
    check_labels,
    fill_template,
    label_words_for,
    split_examples,
    split_given,
)
from zotune.errors import DataError, reading
from zotune.io import json_lines

FORMATS = {
    "text": ("text",),
    "prompt": ("prompt", "completion"),
    "classification": ("input", "label"),
    "choice": ("prompt", "choices", "answer"),
    "chat": ("messages",),
}


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file does not exist", file=str(path))
    records = []
    with reading(path, "one UTF-8 JSON object per line") as at:
        for lineno, obj in json_lines(path, at):
            if not isinstance(obj, dict):
                raise DataError(
                    f"expected a JSON object, got {type(obj).__name__}", file=str(path), line=lineno
                )
            records.append((lineno, obj))
    if not records:
        raise DataError("empty file (no JSON records)", file=str(path))
    return records


def get_field(
    obj: dict,
    name: str,
    types: type | tuple[type, ...],
    file: str | Path,
    line: int | None = None,
    error: type[DataError] = DataError,
):
    """obj[name], checked to be one of types (bool is never accepted as an int)."""
    if name not in obj:
        raise error(f"missing field (record has {sorted(obj)})", file=str(file), line=line, field=name)
    value = obj[name]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        want = " or ".join(t.__name__ for t in types)
        raise error(
            f"expected {want}, got {type(value).__name__} {value!r:.60}",
            file=str(file),
            line=line,
            field=name,
        )
    return value


def _format_of(obj: dict, path: Path, line: int) -> str:
    if "text" in obj:
        return "text"
    if "messages" in obj:
        return "chat"
    if "choices" in obj:
        return "choice"
    if "prompt" in obj or "completion" in obj:
        return "prompt"
    if "input" in obj or "label" in obj:
        return "classification"
    raise DataError(
        f"unknown record format (keys {sorted(obj)}): expected {{text}}, {{prompt, completion}}, "
        "{input, label}, {prompt, choices, answer} or {messages}",
        file=str(path),
        line=line,
    )


def _too_long(text: str, cfg: DataConfig) -> bool:
    return cfg.max_input_chars is not None and len(text) > cfg.max_input_chars


def _read(path: Path, cfg: DataConfig):
    """(format, rows): rows are (line, prompt, target), for classification (line, prompt, label str),
    for choice and chat an Example."""
    records = read_jsonl(path)
    fmt = _format_of(records[0][1], path, records[0][0])
    rows = []
    for line, obj in records:
        where = {"file": str(path), "line": line}
        if fmt == "choice":
            prompt = get_field(obj, "prompt", str, path, line)
            check_choices(obj.get("choices"), obj.get("answer"), where)
            if not _too_long(prompt, cfg):
                if cfg.template is not None:
                    prompt = fill_template(cfg.template, prompt)
                rows.append(
                    Example(
                        prompt=prompt,
                        choices=tuple(obj["choices"]),
                        label=obj["answer"],
                        origin=(str(path), line),
                    )
                )
        elif fmt == "chat":
            rows.append(chat_example(obj, where))
        elif fmt == "text":
            text = get_field(obj, "text", str, path, line)
            if not _too_long(text, cfg):
                rows.append((line, "", text))
        elif fmt == "prompt":
            prompt = get_field(obj, "prompt", str, path, line)
            completion = get_field(obj, "completion", str, path, line)
            if not _too_long(prompt, cfg):
                rows.append(
                    (
                        line,
                        prompt if cfg.template is None else fill_template(cfg.template, prompt),
                        completion,
                        (str(path), line),
                    )
                )
        else:
            text = get_field(obj, "input", str, path, line)
            label = get_field(obj, "label", (str, int), path, line)
            if not _too_long(text, cfg):
                rows.append(
                    (line, text if cfg.template is None else fill_template(cfg.template, text), str(label))
                )
    return fmt, rows


def jsonl_examples(paths: Sequence[str | Path], cfg: DataConfig) -> tuple[str, list[list[Example]]]:
    """(kind, examples of each file). All files must share a format; classification files share one
    set of choices so that train, dev and test are scored alike."""
    paths = [Path(p) for p in paths]
    read = [_read(p, cfg) for p in paths]
    fmt = read[0][0]
    for p, (f, _) in zip(paths, read):
        if f != fmt:
            raise DataError(
                f"records are in the {f!r} format but {paths[0]} is in the {fmt!r} format "
                f"(fields {list(FORMATS[fmt])})",
                file=str(p),
            )
    if fmt != "classification":
        if cfg.labels is not None or cfg.label_words is not None:
            raise DataError(
                f"{paths[0]}: labels apply to classification files ({{input, label}}), not {fmt!r} records",
                field="data.labels" if cfg.labels is not None else "data.label_words",
            )
        if fmt in ("choice", "chat"):
            if fmt == "chat" and cfg.template is not None:
                raise DataError(
                    f"{paths[0]}: chat records use the model's chat template; leave data.template unset",
                    field="data.template",
                )
            return fmt, [rows for _, rows in read]
        # prompt/completion records name their line (a completion that does not fit is an error);
        # {"text"} records do not (they are cut to max_target_length).
        return "generation", [
            [Example(prompt=r[1], target=r[2], origin=r[3] if len(r) > 3 else None) for r in rows]
            for _, rows in read
        ]

    # Choices: data.labels order, else data.label_words order, else order of first appearance.
    check_labels(cfg.labels)
    if cfg.labels is not None:
        labels = list(cfg.labels)
        if cfg.label_words is not None:
            missing = [x for x in labels if x not in cfg.label_words]
            if missing:
                raise DataError(f"labels {missing} have no entry in data.label_words", field="data.labels")
    elif cfg.label_words is not None:
        labels = list(cfg.label_words)
    else:
        labels = list(dict.fromkeys(label for _, rows in read for _, _, label in rows))
    choices = label_words_for(labels, cfg.label_words, str(paths[0]))
    out = []
    for p, (_, rows) in zip(paths, read):
        examples = []
        for line, prompt, label in rows:
            if label not in labels:
                if cfg.labels is None:  # labels came from label_words: an unlisted label is a typo
                    raise DataError(
                        f"unknown label {label!r} (data.label_words has {list(cfg.label_words)})",
                        file=str(p),
                        line=line,
                        field="label",
                    )
                continue  # filtered out by data.labels
            examples.append(Example(prompt=prompt, choices=choices, label=labels.index(label)))
        out.append(examples)
    seen = sorted({labels[ex.label] for examples in out for ex in examples})
    if len(seen) == 1:  # nothing to tell apart: every split would be one class
        raise DataError(
            f"every example has label {seen[0]!r}; a classification task needs at least two labels",
            file=", ".join(str(p) for p in paths),
            field="label",
        )
    return "classification", out


def load_jsonl(spec: str, cfg: DataConfig) -> TaskSplits:
    """spec: one file (splits carved from it with the seed) or three comma-separated files train,dev,test."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) not in (1, 3) or not all(parts):
        raise DataError(
            f"expected jsonl:<file> or jsonl:<train>,<dev>,<test>, got 'jsonl:{spec}'", field="data.task"
        )
    kind, per_file = jsonl_examples(parts, cfg)
    sizes = dict(
        train_size=cfg.train_size, dev_size=cfg.dev_size, test_size=cfg.test_size, seed=cfg.split_seed
    )
    if len(parts) == 1:
        train, dev, test = split_examples(per_file[0], source=parts[0], **sizes)
    else:
        train, dev, test = split_given(per_file[0], per_file[1], per_file[2], source=spec, **sizes)
    return TaskSplits(name=f"jsonl:{spec}", train=train, dev=dev, test=test, kind=kind)
