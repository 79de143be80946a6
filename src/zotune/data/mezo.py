"""The MeZO task family (SST-2, RTE, BoolQ, CB, WiC, WSC, MultiRC, COPA; SQuAD and DROP) with MeZO's
prompts.

Prompts and verbalizers follow princeton-nlp/MeZO, large_models/templates.py (SST2Template, RTETemplate,
BoolQTemplateV3 - MeZO's default for BoolQ -, CBTemplate, WICTemplate, WSCTemplate, MultiRCTemplate,
CopaTemplate). MeZO scores prompt + verbalized candidate; here the prompt is the text before the
candidate and each choice is the candidate word (with its leading space where MeZO has one).

The data is not in any package: point at a Hugging Face `datasets` save_to_disk folder (a DatasetDict
with train/validation, as load_dataset("super_glue", "rte") gives) or at a folder of train.jsonl and
validation.jsonl with the same (GLUE/SuperGLUE) field names. Labels may be the class index, a boolean,
or the class name ("entailment", ...).

Splits, as MeZO: train and dev are drawn from the train split with the seed, test from validation
(the SuperGLUE test labels are hidden). Unlike MeZO, draws are balanced across labels where possible
(see task.py). Without a validation split all three are carved from train.

COPA's choices are whole clauses (several tokens each): it is a "choice" task, each candidate scored by
the summed log-probability of its tokens after the prompt (data/choice.py), as MeZO scores it.

SQuAD and DROP are generation tasks (MeZO's SQuADv2Template and DROPTemplate prompts, the first
reference answer as the completion), judged by generating (eval_generate.py). Rows in the Hugging Face
layouts: SQuAD {title, context, question, answers: {text: [...]}} (or answers: [...]), DROP {passage,
question, answers_spans: {spans: [...]}}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zotune.config import DataConfig
from zotune.data.jsonl import get_field, read_jsonl
from zotune.data.task import Example, TaskSplits, split_examples, split_given
from zotune.errors import DataError


def _question(q: str) -> str:  # BoolQ: "Is it ...?" capitalised, ending in "?"
    q = q if q.endswith("?") else q + "?"
    return q[0].upper() + q[1:]


def _copa_prompt(r: dict) -> str:
    premise = r["premise"].rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    return premise + {"effect": " so", "cause": " because"}[r["question"]]


def _copa_choice(c: str) -> str:  # MeZO's capitalization="correct": lower-case the first word unless "I"
    words = c.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " " + " ".join(words)


@dataclass(frozen=True)
class MezoTask:
    fields: tuple[str, ...]  # string fields the prompt reads
    prompt: Callable[[dict], str]
    words: tuple[str, ...] | None  # verbalizer, indexed by class id; None: choices come from the row (COPA)
    names: tuple[str, ...]  # class names accepted as string labels, indexed by class id
    label_fields: tuple[str, ...] = ("label",)  # first one present is used


TASKS: dict[str, MezoTask] = {
    "sst2": MezoTask(
        ("sentence",),
        lambda r: f"{r['sentence'].strip()} It was",
        (" terrible", " great"),
        ("negative", "positive"),
    ),
    "rte": MezoTask(
        ("premise", "hypothesis"),
        lambda r: f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? Yes or No?\n',
        ("Yes", "No"),
        ("entailment", "not_entailment"),
    ),
    # HF "boolq" has answer: bool; super_glue/boolq has label: 0 (False) / 1 (True). MeZO: True -> "Yes".
    "boolq": MezoTask(
        ("passage", "question"),
        lambda r: f"{r['passage']} {_question(r['question'])}\n",
        ("No", "Yes"),
        ("false", "true"),
        ("label", "answer"),
    ),
    "cb": MezoTask(
        ("premise", "hypothesis"),
        lambda r: f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"),
        ("entailment", "contradiction", "neutral"),
    ),
    "wic": MezoTask(
        ("word", "sentence1", "sentence2"),
        lambda r: (
            f'Does the word "{r["word"]}" have the same meaning in these two sentences? '
            f"Yes, No?\n{r['sentence1']}\n{r['sentence2']}\n"
        ),
        ("No", "Yes"),
        ("false", "true"),
    ),
    "wsc": MezoTask(
        ("text", "span1_text", "span2_text"),
        lambda r: (
            f'{r["text"]}\nIn the previous sentence, does the pronoun "{r["span2_text"].lower()}" '
            f"refer to {r['span1_text']}? Yes or No?\n"
        ),
        ("No", "Yes"),
        ("false", "true"),
    ),
    "multirc": MezoTask(
        ("paragraph", "question", "answer"),
        lambda r: (
            f"{r['paragraph']}\nQuestion: {r['question']}\nI found this answer "
            f'"{r["answer"]}". Is that correct? Yes or No?\n'
        ),
        ("No", "Yes"),
        ("false", "true"),
    ),
    "copa": MezoTask(
        ("premise", "choice1", "choice2", "question"), _copa_prompt, None, ("choice1", "choice2")
    ),
}
ALIASES = {"sst-2": "sst2", "wsc.fixed": "wsc"}


def _label(task: MezoTask, row: dict, where: dict) -> int:
    name = next((f for f in task.label_fields if f in row), task.label_fields[0])
    value = get_field(row, name, (int, bool, str), **where)
    n = len(task.names)
    if isinstance(value, bool):
        index = int(value)  # every boolean task has names ("false", "true")
    elif isinstance(value, int):
        index = value
    else:
        index = task.names.index(value.lower()) if value.lower() in task.names else -1
    if not 0 <= index < n:
        hint = " (-1 marks an unlabelled test split)" if value == -1 else ""
        raise DataError(
            f"unknown label {value!r}: expected 0..{n - 1} or one of {list(task.names)}{hint}",
            field=name,
            **where,
        )
    return index


def _answers(row: dict, name: str, key: str, where: dict) -> list[str]:
    value = row.get(name)
    texts = value.get(key) if isinstance(value, dict) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(
            f"expected a non-empty list of answer strings (or {{{key}: [...]}})", field=name, **where
        )
    return texts


def generative_example(task_name: str, row: dict, where: dict) -> Example:
    origin = (where["file"], where.get("line"))
    get_field(row, "question", str, **where)
    if task_name == "squad":
        for f in ("title", "context"):
            get_field(row, f, str, **where)
        answer = _answers(row, "answers", "text", where)[0]
        prompt = (
            f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question'].strip()}\nAnswer:"
        )
    else:  # drop
        get_field(row, "passage", str, **where)
        answer = _answers(row, "answers_spans", "spans", where)[0]
        prompt = f"Passage: {row['passage']}\nQuestion: {row['question'].strip()}\nAnswer:"
    return Example(prompt=prompt, target=" " + answer.strip(), origin=origin)


GENERATIVE = ("squad", "drop")


def row_example(task_name: str, row: dict, where: dict) -> Example:
    """One GLUE/SuperGLUE row -> Example. where = {"file": ..., "line": ...} for error messages."""
    if task_name in GENERATIVE:
        return generative_example(task_name, row, where)
    task = TASKS[task_name]
    for f in task.fields:
        get_field(row, f, str, **where)
    if task_name == "copa" and row["question"] not in ("cause", "effect"):
        raise DataError(f"expected 'cause' or 'effect', got {row['question']!r}", field="question", **where)
    label = _label(task, row, where)
    words = task.words or (_copa_choice(row["choice1"]), _copa_choice(row["choice2"]))
    return Example(prompt=task.prompt(row), choices=words, label=label)


def _read_split(task_name: str, folder: Path, split: str) -> list[Example] | None:
    """Examples of one split, or None when the folder does not have it."""
    on_disk = (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()
    if on_disk:
        import datasets  # imported here: about 1 s, and only this loader needs it

        try:
            data = datasets.load_from_disk(str(folder))
        except Exception as e:  # datasets raises many types for a damaged folder
            raise DataError(
                f"cannot load as a datasets save_to_disk folder ({e})", file=str(folder)
            ) from None
        if isinstance(data, datasets.Dataset):  # a single Dataset: it is the train split
            data = datasets.DatasetDict({"train": data})
        if split not in data:
            return None
        return [
            row_example(task_name, row, {"file": f"{folder} [{split}] row {i}"})
            for i, row in enumerate(data[split].to_list())
        ]
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        return None
    return [row_example(task_name, row, {"file": str(path), "line": line}) for line, row in read_jsonl(path)]


def load_mezo(name: str, path: str, cfg: DataConfig) -> TaskSplits:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS and key not in GENERATIVE:
        raise DataError(
            f"unknown MeZO task '{name}' (expected one of {sorted(TASKS) + list(GENERATIVE)})",
            field="data.task",
        )
    if not path:
        raise DataError(
            f"expected mezo:{name}:<folder> (a datasets save_to_disk folder or a folder of "
            "train.jsonl and validation.jsonl)",
            field="data.task",
        )
    folder = Path(path)
    if not folder.is_dir():
        raise DataError("folder does not exist", file=str(folder), field="data.task")
    if cfg.labels is not None or cfg.label_words is not None or cfg.template is not None:
        raise DataError(
            "MeZO tasks use MeZO's prompts and verbalizers; leave data.labels, data.label_words "
            "and data.template unset (or convert the data to jsonl:)",
            field="data.task",
        )
    train = _read_split(key, folder, "train")
    if train is None:
        raise DataError(
            "no train split (expected a datasets save_to_disk folder with a 'train' split, or train.jsonl)",
            file=str(folder),
        )
    test = _read_split(key, folder, "validation")
    if cfg.max_input_chars is not None:  # MeZO rows have several fields: limit the whole prompt
        train = [e for e in train if len(e.prompt) <= cfg.max_input_chars]
        if test is not None:
            test = [e for e in test if len(e.prompt) <= cfg.max_input_chars]
    sizes = dict(
        train_size=cfg.train_size, dev_size=cfg.dev_size, test_size=cfg.test_size, seed=cfg.split_seed
    )
    if test is None:
        tr, dev, te = split_examples(train, source=str(folder), **sizes)
    else:
        tr, dev, te = split_given(train, None, test, source=str(folder), **sizes)
    kind = "choice" if key == "copa" else "generation" if key in GENERATIVE else "classification"
    return TaskSplits(name=f"mezo:{key}", train=tr, dev=dev, test=te, kind=kind)
