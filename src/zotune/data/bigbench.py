"""BIG-bench JSON tasks, read from the bigbench==1.0.0 sdist (never pip-installed: it pulls TensorFlow).

The 358 MB archive is downloaded once into <cache>/bigbench. Scanning the gzipped tar takes seconds, so
the member table (offset and size of every task.json) is indexed once into a JSON file next to it, a
task.json is read by seeking straight to its offset, and each extracted task.json is cached as a plain
file: a second load touches the archive not at all.

Names: `multiemo` or `multiemo/all_sentence_en` (a subtask folder). Tasks that exist only as subtasks
need the subtask named, unless DEFAULTS picks one (multiemo -> English sentences).

Examples {"input", "target_scores"} are multiple choice (choices = " " + each key, or data.label_words;
label = the highest score): scored as one-token classification when every choice is one token, else
each choice as a token sequence (data/choice.py); {"input", "target"} are generation (first target
if a list; a space is put in front of it, as the templates end just before the answer word).
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from zotune.config import DataConfig
from zotune.data.task import Example, TaskSplits, check_labels, fill_template, label_words_for, split_examples
from zotune.errors import DataError
from zotune.io import atomic_write_bytes
from zotune.paths import cache_dir

VERSION = "1.0.0"
ARCHIVE = f"bigbench-{VERSION}.tar.gz"
# sha256 of the sdist on PyPI: a download (and `zotune fetch`, on the cached copy) is checked against it.
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
ROOT = f"bigbench-{VERSION}/bigbench/benchmark_tasks/"  # task folders inside the archive
INDEX_FORMAT = 1
OLD_PIP = "25.3"  # see _pip_rejects_bigbench

GENERIC_TEMPLATE = "{input}\nAnswer:"
# Per-task defaults, used where the config leaves a field unset.
DEFAULTS: dict[str, dict] = {
    "multiemo": {
        "subtask": "all_sentence_en",  # English sentences; other folders are other languages / whole texts
        "labels": ["positive", "negative"],  # the SST-2-like binary part (also: neutral, ambivalent)
        "template": "Review: {input}\nSentiment (positive or negative):",
    }
}


def bigbench_dir() -> Path:
    path = cache_dir() / "bigbench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise DataError(f"could not download {what} with `{' '.join(cmd)}` (exit {proc.returncode}):\n{tail}")


def _pip_rejects_bigbench() -> bool:
    # Recent pips (26.x; 25.3 does not) refuse any sdist from PyPI whose metadata declares a direct URL
    # dependency, even with --no-deps, and bigbench's setup.py declares `bleurt @ file://...`. Those pips
    # carry this module.
    try:
        return importlib.util.find_spec("pip._internal.metadata.direct_references") is not None
    except ModuleNotFoundError:  # no pip at all: the download command will say so
        return False


def check_archive(path: Path) -> None:
    """The archive is the pinned sdist (ARCHIVE_SHA256)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != ARCHIVE_SHA256:
        raise DataError(
            f"{path}: sha256 {h.hexdigest()}, expected {ARCHIVE_SHA256} (bigbench=={VERSION} from PyPI); "
            "delete it and run `zotune fetch` again"
        )


def bigbench_archive(verify: bool = False) -> Path:
    """Path of bigbench-1.0.0.tar.gz, downloaded with pip the first time (into a temp dir, checked
    against its pinned sha256, then renamed, so an interrupted or altered download never leaves an
    archive behind). verify: check a cached archive's hash too (`zotune fetch`)."""
    root = bigbench_dir()
    path = root / ARCHIVE
    if path.is_file():
        if verify:
            check_archive(path)
        return path
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=root))
    try:
        print(
            f"zotune: downloading the BIG-bench sdist (bigbench=={VERSION}, 358 MB) into {root} (once)",
            file=sys.stderr,
        )
        pip = [sys.executable, "-m", "pip"]
        if _pip_rejects_bigbench():  # fetch the last pip without that check and run it from its wheel
            _run(
                pip + ["download", "--no-deps", "--only-binary", ":all:", f"pip=={OLD_PIP}", "-d", str(tmp)],
                f"pip=={OLD_PIP}",
            )
            pip = [sys.executable, str(tmp / f"pip-{OLD_PIP}-py3-none-any.whl" / "pip")]
        _run(
            pip + ["download", "--no-deps", "--no-binary", ":all:", f"bigbench=={VERSION}", "-d", str(tmp)],
            f"bigbench=={VERSION}",
        )
        if not (tmp / ARCHIVE).is_file():
            raise DataError(f"pip reported success but {ARCHIVE} is not in {tmp}")
        check_archive(tmp / ARCHIVE)
        os.replace(tmp / ARCHIVE, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def archive_index(archive: Path) -> dict:
    """{"tasks": {name: [offset, size]}, "programmatic": [names]}, built once per archive."""
    index_path = archive.with_name(archive.name + ".index.json")
    size = archive.stat().st_size
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") == INDEX_FORMAT and index.get("size") == size:
                return index
        except (OSError, ValueError):
            pass  # unreadable index: rebuild it
    tasks, scripts = {}, set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                if not m.isfile() or not m.name.startswith(ROOT):
                    continue
                rel, _, base = m.name[len(ROOT) :].rpartition("/")
                if base == "task.json":
                    tasks[rel] = [m.offset_data, m.size]
                elif base == "task.py":
                    scripts.add(rel)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(
            f"cannot read the BIG-bench archive ({e}); delete it to download it again", file=str(archive)
        ) from None
    index = {
        "format": INDEX_FORMAT,
        "size": size,
        "tasks": tasks,
        "programmatic": sorted(scripts - set(tasks)),
    }
    atomic_write_bytes(index_path, json.dumps(index).encode())
    return index


def resolve(name: str, index: dict) -> str:
    """Archive folder (relative to benchmark_tasks) of the task called name."""
    rel = name.strip().strip("/")
    tasks = index["tasks"]
    subtasks = sorted(t for t in tasks if t.startswith(rel + "/"))
    if rel in tasks and not subtasks:
        return rel
    if subtasks:  # BIG-bench keeps no examples in the task.json of a task that has subtasks
        default = DEFAULTS.get(rel, {}).get("subtask")
        if default:
            return f"{rel}/{default}"
        raise DataError(
            f"BIG-bench task '{rel}' has {len(subtasks)} subtasks; name one, e.g. "
            f"bigbench:{subtasks[0]} (subtasks: {', '.join(s.split('/', 1)[1] for s in subtasks)})",
            field="data.task",
        )
    if rel in index["programmatic"]:
        raise DataError(
            f"BIG-bench task '{rel}' is programmatic (task.py); only JSON tasks can be loaded",
            field="data.task",
        )
    names = list(tasks) + index["programmatic"]
    close = difflib.get_close_matches(rel, names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise DataError(f"unknown BIG-bench task '{rel}'{hint}", field="data.task")


def read_task(archive: Path, index: dict, rel: str) -> dict:
    """The parsed task.json of rel, extracted once into <cache>/bigbench/tasks/<rel>/task.json."""
    cached = bigbench_dir() / "tasks" / rel / "task.json"
    if not cached.is_file():
        offset, size = index["tasks"][rel]
        with gzip.open(archive, "rb") as f:  # gzip seeks by decompressing up to offset: no tar scan
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise DataError("archive is truncated; delete it to download it again", file=str(archive))
        atomic_write_bytes(cached, data)
    try:
        return json.loads(cached.read_bytes())
    except ValueError as e:
        raise DataError(f"invalid JSON ({e}); delete it to extract it again", file=str(cached)) from None


def task_examples(task: dict, cfg: DataConfig, defaults: dict, source: str) -> tuple[str, list[Example]]:
    """(kind, examples) of one task.json, after data.labels / label_words / max_input_chars / template."""
    raw = task.get("examples")
    if not isinstance(raw, list) or not raw:
        raise DataError("task has no examples", file=source, field="examples")
    for i, ex in enumerate(raw):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise DataError(
                "expected an object with a string 'input'", file=source, field=f"examples[{i}].input"
            )
    template = cfg.template or defaults.get("template") or GENERIC_TEMPLATE
    short = [cfg.max_input_chars is None or len(ex["input"]) <= cfg.max_input_chars for ex in raw]

    if all("target_scores" in ex for ex in raw):
        for i, ex in enumerate(raw):
            if not isinstance(ex["target_scores"], dict) or len(ex["target_scores"]) < 2:
                raise DataError(
                    "expected a mapping of at least 2 choices -> score",
                    file=source,
                    field=f"examples[{i}].target_scores",
                )
        all_labels = list(dict.fromkeys(k for ex in raw for k in ex["target_scores"]))
        labels = cfg.labels if cfg.labels is not None else defaults.get("labels")
        check_labels(labels)
        if labels is not None:
            unknown = [x for x in labels if x not in all_labels]
            if unknown:
                raise DataError(
                    f"{source}: labels {unknown} are not choices of this task (choices: {all_labels[:20]})",
                    field="data.labels",
                )
        label_words_for(all_labels, cfg.label_words, source)  # every label_words key must be a real label
        # One fixed choice order when every example offers the same choices (keeps label i = word i).
        same = all(set(ex["target_scores"]) == set(raw[0]["target_scores"]) for ex in raw)
        fixed = list(labels) if labels is not None else list(raw[0]["target_scores"]) if same else None
        words = cfg.label_words or {}
        examples = []
        for ex, ok in zip(raw, short):
            scores = ex["target_scores"]
            best = max(scores, key=scores.get)  # first of the highest-scored choices
            names = fixed or list(scores)
            if ok and best in names:  # else: too long, or filtered out by data.labels
                examples.append(
                    Example(
                        prompt=fill_template(template, ex["input"]),
                        choices=tuple(words.get(n, " " + n) for n in names),
                        label=names.index(best),
                    )
                )
        return "classification", examples

    if all("target" in ex for ex in raw):
        if cfg.labels is not None or cfg.label_words is not None:
            raise DataError(
                f"{source}: generation task (examples have 'target', not 'target_scores'): "
                "labels do not apply",
                field="data.labels" if cfg.labels is not None else "data.label_words",
            )
        examples = []
        for i, (ex, ok) in enumerate(zip(raw, short)):
            target = ex["target"][0] if isinstance(ex["target"], list) and ex["target"] else ex["target"]
            if not isinstance(target, str):
                raise DataError(
                    "expected a string or a non-empty list of strings",
                    file=source,
                    field=f"examples[{i}].target",
                )
            if ok:
                target = target if target[:1].isspace() else " " + target
                examples.append(Example(prompt=fill_template(template, ex["input"]), target=target))
        return "generation", examples

    raise DataError(
        "examples mix formats: expected all {input, target_scores} or all {input, target}",
        file=source,
        field="examples",
    )


def load_bigbench(name: str, cfg: DataConfig) -> TaskSplits:
    archive = bigbench_archive()
    index = archive_index(archive)
    rel = resolve(name, index)
    source = f"{ROOT}{rel}/task.json"
    kind, examples = task_examples(
        read_task(archive, index, rel), cfg, DEFAULTS.get(rel.split("/")[0], {}), source
    )
    train, dev, test = split_examples(
        examples, cfg.train_size, cfg.dev_size, cfg.test_size, cfg.split_seed, source
    )
    return TaskSplits(name=f"bigbench:{rel}", train=train, dev=dev, test=test, kind=kind)
