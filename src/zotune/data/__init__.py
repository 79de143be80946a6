"""Tasks -> train/dev/test examples -> fixed-shape batches.

    splits = load_task(cfg.data)                  # TaskSplits of Examples
    batch = encode(splits.train, tokenizer, cfg.data.max_length, cfg.data.max_target_length, splits.kind)

data.task is one of
    bigbench:<name>[/<subtask>]       a BIG-bench JSON task from the bigbench==1.0.0 sdist
    jsonl:<file>                      one JSONL file, train/dev/test carved from it with data.split_seed
    jsonl:<train>,<dev>,<test>        three JSONL files
    mezo:<name>:<folder>              SST-2/RTE/BoolQ/CB/WiC/WSC/MultiRC/COPA with MeZO's prompts
"""

from __future__ import annotations

from zotune.config import DataConfig
from zotune.data.bigbench import load_bigbench
from zotune.data.jsonl import load_jsonl
from zotune.data.mezo import load_mezo
from zotune.data.task import Example, TaskSplits, split_examples
from zotune.data.tokenize import Batch, encode
from zotune.errors import DataError

__all__ = ["Batch", "Example", "TaskSplits", "encode", "load_task", "split_examples"]

SCHEMES = ("bigbench", "jsonl", "mezo")


def load_task(cfg: DataConfig) -> TaskSplits:
    scheme, sep, rest = cfg.task.partition(":")
    if scheme not in SCHEMES:
        raise DataError(
            f"unknown task scheme '{scheme}' in '{cfg.task}' (expected bigbench:<name>, "
            "jsonl:<file>, jsonl:<train>,<dev>,<test> or mezo:<name>:<folder>)",
            field="data.task",
        )
    if not rest.strip():
        raise DataError(f"'{cfg.task}' names no task after '{scheme}:'", field="data.task")
    if scheme == "bigbench":
        return load_bigbench(rest, cfg)
    if scheme == "jsonl":
        return load_jsonl(rest, cfg)
    name, _, path = rest.partition(":")
    return load_mezo(name, path, cfg)
