"""One typed config: dataclasses that load from YAML and take `--section.key value` overrides.

Unknown sections or keys and values of the wrong type are errors that name the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zotune.checks import RANGES, range_error
from zotune.errors import ConfigError


def _field(default, help: str, check: str | None = None, choices: tuple | None = None, resumable=False):
    """A config field with the help text `zotune train --help` shows and the values it accepts:
    `check` names a range of zotune.checks.RANGES (numbers are always required to be finite),
    `choices` the strings allowed. `resumable`: the field does not alter the training trajectory,
    so `--resume` may change it (threads, progress bar, logging, time limits)."""
    meta = {"help": help, "check": check, "choices": choices, "resumable": resumable}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Which model to load, and how."""

    name: str = _field("smollm2-135m", "embedded name, local folder, .gguf file, or hub id")
    dtype: str = _field(
        "float32",
        "float32 | float64 | bfloat16 | float16",
        choices=("float32", "float64", "bfloat16", "float16"),
    )
    trust_remote_code: bool = _field(False, "let transformers run a model folder's own code")


@dataclass
class DataConfig:
    """The task, its seeded train/dev/test splits, and the static shapes they are tokenised to."""

    task: str = _field("bigbench:multiemo", "bigbench:<name>[/<subtask>], jsonl:<path>, mezo:<name>:<path>")
    labels: list[str] | None = _field(None, "keep only examples whose label is one of these")
    label_words: dict[str, str] | None = _field(None, "label -> verbalizer word (classification)")
    template: str | None = _field(None, "prompt template with {input}")
    train_size: int = _field(1000, "examples in the train split", "positive")
    dev_size: int = _field(200, "examples in the dev split (model selection)", "positive")
    test_size: int = _field(500, "examples in the test split (reported once, at the end)", "positive")
    max_input_chars: int | None = _field(None, "drop examples with longer inputs", "positive")
    split_seed: int = _field(0, "seed of the train/dev/test split", "non_negative")
    max_length: int = _field(
        64, "static sequence length (left padding, prompt truncated on the left)", "positive"
    )
    max_target_length: int = _field(16, "static completion length for generation tasks", "positive")
    length_normalize: bool = _field(
        False, "multiple choice: score a choice by the mean log-probability of its tokens instead of the sum"
    )


@dataclass
class AdapterConfig:
    """What is trained: LoRA-FA (A frozen from a seeded init, B trained), LoRA (both), or every
    weight of the model (full, MeZO)."""

    kind: str = _field(
        "lora-fa",
        "lora-fa (A frozen, B trained) | lora (A and B) | full",
        choices=("lora-fa", "lora", "full"),
    )
    rank: int = _field(16, "LoRA rank r", "positive")
    alpha: float = _field(32.0, "LoRA alpha (scale alpha / r)", "positive")
    dropout: float = _field(0.0, "LoRA dropout on the adapter input", "unit_interval")
    # all-linear: every linear layer of the decoder blocks (not the LM head), whatever the
    # family calls them (q,k,v,o,gate,up,down on Llama and Qwen2; c_attn,c_proj,c_fc on GPT-2)
    targets: list[str] = _field(
        ["all-linear"], "layers to adapt: all-linear, leaf names (q_proj) or full-name regexes"
    )
    init_seed: int = _field(0, "seed of LoRA's A initialisation", "non_negative")


@dataclass
class OptimConfig:
    """One step: the estimator, its q directions and b examples, and the update rule."""

    estimator: str = _field(
        "prge", "prge (one batched pass) | rge (sequential) | fo (backprop)", choices=("prge", "rge", "fo")
    )
    q: int = _field(4, "query directions per step", "positive")
    batch_size: int = _field(4, "distinct examples per step (b)", "positive")
    dual: bool = _field(True, "prge: +eps and -eps replicas in the same forward pass")
    eps: float = _field(1e-2, "perturbation size", "positive")
    lr: float = _field(3e-3, "learning rate", "positive")
    schedule: str = _field("constant", "constant | linear | cosine", choices=("constant", "linear", "cosine"))
    warmup_steps: int = _field(0, "linear warm-up steps", "non_negative")
    min_lr_ratio: float = _field(0.0, "final lr / lr for linear and cosine decay", "closed_unit")
    momentum: float = _field(
        0.0,
        "ZO-SGD heavy-ball momentum on the estimated gradient (fo with sgd: SGD momentum)",
        "unit_interval",
    )
    normalize: str = _field(
        "none",
        "none | rms: lr divided by the running RMS of g, so lr is a step size in parameter "
        "units whatever the loss scale | ms: lr divided by the running mean of g^2 (ZO only)",
        choices=("none", "rms", "ms"),
    )
    rms_decay: float = _field(
        0.95, "decay of the running mean of g^2 that normalize: rms and ms use", "unit_interval"
    )
    noise: str = _field("normal", "normal (Irwin-Hall) | rademacher", choices=("normal", "rademacher"))
    optimizer: str = _field("adamw", "fo only: sgd | adamw", choices=("sgd", "adamw"))
    weight_decay: float = _field(0.0, "fo only: weight decay", "non_negative")


@dataclass
class TrainConfig:
    """The run: how long, how often it evaluates, checkpoints and logs, and where it writes.

    Model selection is by dev only; test is evaluated once, at the end."""

    steps: int = _field(200, "training steps", "non_negative")
    seed: int = _field(0, "seed of batches and step seeds", "non_negative")
    eval_every: int = _field(50, "evaluate on dev every N steps (and at the last)", "positive")
    checkpoint_every: int = _field(
        50, "checkpoint every N steps (and at the last)", "positive", resumable=True
    )
    log_every: int = _field(
        1, "write a train record to metrics.jsonl every N steps", "positive", resumable=True
    )
    eval_batch_size: int = _field(32, "rows per evaluation batch", "positive", resumable=True)
    time_limit_s: float | None = _field(
        None,
        "stop once this much training time (evaluation excluded) is spent",
        "non_negative",
        resumable=True,
    )
    track_test: bool = _field(
        False, "also score test at every dev eval, for curves only (selection stays on dev)", resumable=True
    )
    out_dir: str = _field("runs/default", "run folder: logs, checkpoints, adapter, plot", resumable=True)
    threads: int | None = _field(
        None, "torch (and ExecuTorch) threads; default: all cores", "positive", resumable=True
    )
    progress: bool = _field(True, "show a progress bar", resumable=True)
    parallel: str = _field(
        "none",
        "under torchrun: how a step is split over the ranks, none, data "
        "(the batch) or query (the queries); one process ignores it",
        choices=("none", "data", "query"),
        resumable=True,
    )
    dist_timeout_s: float = _field(
        300.0,
        "under torchrun: a collective that waits longer than this is an error",
        "positive",
        resumable=True,
    )


@dataclass
class FederatedConfig:
    """`zotune federate`: K clients each hold a shard of the train split; zo clients send (seed, g)
    records, fedavg clients (the first-order baseline) send their trained tensors."""

    mode: str = _field(
        "zo",
        "zo (clients send (seed, g) records) | fedavg (first-order clients send B)",
        choices=("zo", "fedavg"),
    )
    clients: int = _field(
        8, "partitions of the train split; the simulation starts this many SuperNodes", "positive"
    )
    rounds: int = _field(10, "federated rounds", "positive")
    local_steps: int = _field(5, "client steps per round", "positive")
    fraction: float = _field(1.0, "share of the connected clients sampled each round", "fraction")
    min_fraction: float = _field(
        0.5, "a round is applied only if this share of the sampled clients answered validly", "fraction"
    )
    partition: str = _field("iid", "iid | dirichlet (label skew)", choices=("iid", "dirichlet"))
    alpha: float = _field(0.5, "dirichlet concentration: smaller is more skewed", "positive")
    partition_seed: int = _field(0, "seed of the partition", "non_negative")
    catch_up_limit: int = _field(
        1000, "a client more records behind than this gets the adapter instead", "non_negative"
    )
    max_abs_g: float = _field(1000.0, "a client reply with any |g| above this is dropped", "positive")
    max_count: int = _field(1000000, "a client claiming more examples than this is dropped", "positive")
    server_lr: float = _field(
        1.0,
        "zo: the server's step on the example-weighted mean of the clients' updates (1: FedAvg; "
        "the number of clients per round: their summed updates)",
        "positive",
    )
    fedavg_lr: float = _field(
        1e-3, "fedavg: the clients' first-order (optim.optimizer) learning rate", "positive"
    )
    parallel: int = _field(2, "simulation: clients running at once (one CPU each)", "positive")
    wait_clients_s: float = _field(
        120.0, "how long the server waits for `clients` SuperNodes to connect", "positive"
    )
    round_timeout_s: float = _field(1800.0, "replies later than this are treated as missing", "positive")
    eval_every: int = _field(
        1, "rounds between server-side dev/test evaluations (and the last round)", "positive"
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # --data.labels a,b
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{source}: expected a key of the form section.key, got '{dotted}'")
    section_name, key = parts
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections:
        raise ConfigError(f"{source}: unknown section '{section_name}' (expected one of {sorted(sections)})")
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(f"{source}: unknown key '{section_name}.{key}' (expected one of {sorted(hints)})")
    where = f"{source}: {section_name}.{key}"
    value = _coerce(value, hints[key], where)
    meta = next(f.metadata for f in dataclasses.fields(section) if f.name == key)
    check_field(where, value, meta)  # here too, so the error names the file or override
    setattr(section, key, value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML itself keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(
                    f"{self.name}: line {line}: key '{key}' is given twice (first on line {seen[key]})"
                )
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; invalid text or YAML is a ConfigError naming the file and line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte {e.start}); expected a YAML file"
        ) from None
    loader = None
    try:
        loader = _UniqueKeyLoader(text)  # its reader refuses control characters right away
        loader.name = str(path)
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else text[: getattr(e, "position", 0)].count("\n") + 1
        where = f"line {line}: "
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
    except (ValueError, OverflowError, RecursionError) as e:  # e.g. a timestamp out of range
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `--section.key value` overrides (in that order)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        for section_name, section in raw.items():
            if not isinstance(section, dict):
                raise ConfigError(f"{path}: section '{section_name}' must be a mapping")
            for key, value in section.items():
                _set(cfg, f"{section_name}.{key}", value, str(path))
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    it = iter(overrides)
    for token in it:
        if not token.startswith("--"):
            raise ConfigError(f"override '{token}': expected --section.key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            try:
                value = next(it)
            except StopIteration:
                raise ConfigError(f"override --{key}: missing value") from None
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        _set(cfg, key, parsed, f"override --{key}")


def validate(cfg: Config) -> None:
    """Every field against what its declaration accepts (`_field`'s check and choices), then the
    rules that tie fields together."""
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            check_field(f"{section.name}.{f.name}", getattr(getattr(cfg, section.name), f.name), f.metadata)
    if cfg.adapter.kind == "full" and cfg.optim.estimator == "prge":
        raise ConfigError(
            "optim.estimator: prge needs an adapter (adapter.kind lora-fa or lora); "
            "use rge for full-parameter ZO"
        )


def check_field(name: str, value: Any, meta: dict) -> None:
    """One value against a field's declared range (zotune.checks.RANGES) or choices."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: expected one of {list(choices)}, got '{value}'")
    expected = range_error(value, meta.get("check"))
    if expected is not None:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def fields_help() -> str:
    """Every config field as `--section.key` with its type, default, range and help, for --help."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            kind = str(hints[f.name]).replace("typing.", "")
            kind = getattr(hints[f.name], "__name__", kind) if "[" not in kind else kind
            notes = [kind, f"default {default!r}"]
            if f.metadata.get("check"):
                notes.append(RANGES[f.metadata["check"]][1])
            if f.metadata.get("resumable"):
                notes.append("may change on --resume")
            lines.append(
                f"  --{section.name}.{f.name} ({', '.join(notes)})\n      {f.metadata.get('help', '')}"
            )
    return "\n".join(lines)
