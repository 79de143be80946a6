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

from zotune.errors import ConfigError


def _field(default, help: str):
    """A config field with the help text `zotune train --help` shows."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """Which model to load, and how."""

    name: str = _field("smollm2-135m", "embedded name, local folder, .gguf file, or hub id")
    dtype: str = _field("float32", "float32 | float64 | bfloat16 | float16")
    trust_remote_code: bool = _field(False, "let transformers run a model folder's own code")


@dataclass
class DataConfig:
    """The task, its seeded train/dev/test splits, and the static shapes they are tokenised to."""

    task: str = _field("bigbench:multiemo", "bigbench:<name>[/<subtask>], jsonl:<path>, mezo:<name>:<path>")
    labels: list[str] | None = _field(None, "keep only examples whose label is one of these")
    label_words: dict[str, str] | None = _field(None, "label -> verbalizer word (classification)")
    template: str | None = _field(None, "prompt template with {input}")
    train_size: int = _field(1000, "examples in the train split")
    dev_size: int = _field(200, "examples in the dev split (model selection)")
    test_size: int = _field(500, "examples in the test split (reported once, at the end)")
    max_input_chars: int | None = _field(None, "drop examples with longer inputs")
    split_seed: int = _field(0, "seed of the train/dev/test split")
    max_length: int = _field(64, "static sequence length (left padding, prompt truncated on the left)")
    max_target_length: int = _field(16, "static completion length for generation tasks")
    length_normalize: bool = _field(
        False, "multiple choice: score a choice by the mean log-probability of its tokens instead of the sum"
    )


@dataclass
class AdapterConfig:
    """What is trained: LoRA-FA (A frozen from a seeded init, B trained), LoRA (both), or every
    weight of the model (full, MeZO)."""

    kind: str = _field("lora-fa", "lora-fa (A frozen, B trained) | lora (A and B) | full")
    rank: int = _field(16, "LoRA rank r")
    alpha: float = _field(32.0, "LoRA alpha (scale alpha / r)")
    dropout: float = _field(0.0, "LoRA dropout on the adapter input")
    # all-linear: every linear layer of the decoder blocks (not the LM head), whatever the
    # family calls them (q,k,v,o,gate,up,down on Llama and Qwen2; c_attn,c_proj,c_fc on GPT-2)
    targets: list[str] = _field(
        ["all-linear"], "layers to adapt: all-linear, leaf names (q_proj) or full-name regexes"
    )
    init_seed: int = _field(0, "seed of LoRA's A initialisation")


@dataclass
class OptimConfig:
    """One step: the estimator, its q directions and b examples, and the update rule."""

    estimator: str = _field("prge", "prge (one batched pass) | rge (sequential) | fo (backprop)")
    q: int = _field(4, "query directions per step")
    batch_size: int = _field(4, "distinct examples per step (b)")
    dual: bool = _field(True, "prge: +eps and -eps replicas in the same forward pass")
    eps: float = _field(1e-2, "perturbation size")
    lr: float = _field(3e-3, "learning rate")
    schedule: str = _field("constant", "constant | linear | cosine")
    warmup_steps: int = _field(0, "linear warm-up steps")
    min_lr_ratio: float = _field(0.0, "final lr / lr for linear and cosine decay")
    momentum: float = _field(
        0.0, "ZO-SGD heavy-ball momentum on the estimated gradient (fo with sgd: SGD momentum)"
    )
    normalize: str = _field(
        "none",
        "rms: lr divided by the running RMS of g, so lr is a step "
        "size in parameter units whatever the loss scale (ZO only)",
    )
    rms_decay: float = _field(0.95, "decay of the running mean of g^2 that normalize: rms uses")
    noise: str = _field("normal", "normal (Irwin-Hall) | rademacher")
    optimizer: str = _field("adamw", "fo only: sgd | adamw")
    weight_decay: float = _field(0.0, "fo only: weight decay")


@dataclass
class TrainConfig:
    """The run: how long, how often it evaluates, checkpoints and logs, and where it writes.

    Model selection is by dev only; test is evaluated once, at the end."""

    steps: int = _field(200, "training steps")
    seed: int = _field(0, "seed of batches and step seeds")
    eval_every: int = _field(50, "evaluate on dev every N steps (and at the last)")
    checkpoint_every: int = _field(50, "checkpoint every N steps (and at the last)")
    log_every: int = _field(1, "write a train record to metrics.jsonl every N steps")
    eval_batch_size: int = _field(32, "rows per evaluation batch")
    time_limit_s: float | None = _field(
        None, "stop once this much training time (evaluation excluded) is spent"
    )
    track_test: bool = _field(
        False, "also score test at every dev eval, for curves only (selection stays on dev)"
    )
    out_dir: str = _field("runs/default", "run folder: logs, checkpoints, adapter, plot")
    threads: int | None = _field(None, "torch (and ExecuTorch) threads; default: all cores")
    progress: bool = _field(True, "show a progress bar")
    parallel: str = _field(
        "none",
        "under torchrun: how a step is split over the ranks, data "
        "(the batch) or query (the queries); one process ignores it",
    )
    dist_timeout_s: float = _field(
        300.0, "under torchrun: a collective that waits longer than this is an error"
    )


@dataclass
class FederatedConfig:
    """`zotune federate`: K clients each hold a shard of the train split; zo clients send (seed, g)
    records, fedavg clients (the first-order baseline) send their trained tensors."""

    mode: str = _field("zo", "zo (clients send (seed, g) records) | fedavg (first-order clients send B)")
    clients: int = _field(8, "partitions of the train split; the simulation starts this many SuperNodes")
    rounds: int = _field(10, "federated rounds")
    local_steps: int = _field(5, "client steps per round")
    fraction: float = _field(1.0, "share of the connected clients sampled each round")
    min_fraction: float = _field(
        0.5, "a round is applied only if this share of the sampled clients answered validly"
    )
    partition: str = _field("iid", "iid | dirichlet (label skew)")
    alpha: float = _field(0.5, "dirichlet concentration: smaller is more skewed")
    partition_seed: int = _field(0, "seed of the partition")
    catch_up_limit: int = _field(1000, "a client more records behind than this gets the adapter instead")
    max_abs_g: float = _field(1000.0, "a client reply with any |g| above this is dropped")
    max_count: int = _field(1000000, "a client claiming more examples than this is dropped")
    fedavg_lr: float = _field(1e-3, "fedavg: the clients' first-order (optim.optimizer) learning rate")
    parallel: int = _field(2, "simulation: clients running at once (one CPU each)")
    wait_clients_s: float = _field(120.0, "how long the server waits for `clients` SuperNodes to connect")
    round_timeout_s: float = _field(1800.0, "replies later than this are treated as missing")
    eval_every: int = _field(1, "rounds between server-side dev/test evaluations (and the last round)")


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
    setattr(section, key, _coerce(value, hints[key], f"{source}: {section_name}.{key}"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `--section.key value` overrides (in that order)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
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


_CHOICES = {
    ("adapter", "kind"): ("lora-fa", "lora", "full"),
    ("optim", "estimator"): ("prge", "rge", "fo"),
    ("optim", "schedule"): ("constant", "linear", "cosine"),
    ("optim", "noise"): ("normal", "rademacher"),
    ("optim", "normalize"): ("none", "rms", "ms"),
    ("optim", "optimizer"): ("sgd", "adamw"),
    ("model", "dtype"): ("float32", "float64", "bfloat16", "float16"),
    ("federated", "mode"): ("zo", "fedavg"),
    ("federated", "partition"): ("iid", "dirichlet"),
    ("train", "parallel"): ("none", "data", "query"),
}


def validate(cfg: Config) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}: expected one of {list(allowed)}, got '{value}'")
    for section, key in (
        ("optim", "q"),
        ("optim", "batch_size"),
        ("adapter", "rank"),
        ("data", "max_length"),
        ("train", "eval_batch_size"),
    ):
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"{section}.{key}: expected a positive integer")
    if cfg.optim.eps <= 0:
        raise ConfigError("optim.eps: expected a positive number")
    if cfg.train.dist_timeout_s <= 0:
        raise ConfigError("train.dist_timeout_s: expected a positive number")
    if not 0.0 <= cfg.optim.rms_decay < 1.0:
        raise ConfigError("optim.rms_decay: expected a number in [0, 1)")
    if cfg.train.steps < 0:
        raise ConfigError("train.steps: expected a non-negative integer")
    validate_federated(cfg)
    if cfg.adapter.kind == "full" and cfg.optim.estimator == "prge":
        raise ConfigError(
            "optim.estimator: prge needs an adapter (adapter.kind lora-fa or lora); "
            "use rge for full-parameter ZO"
        )


def validate_federated(cfg: Config) -> None:
    f = cfg.federated
    for key in ("clients", "rounds", "local_steps", "parallel", "eval_every", "max_count"):
        if getattr(f, key) < 1:
            raise ConfigError(f"federated.{key}: expected a positive integer")
    for key in ("fraction", "min_fraction"):
        if not 0.0 < getattr(f, key) <= 1.0:
            raise ConfigError(f"federated.{key}: expected a number in (0, 1]")
    for key in ("alpha", "max_abs_g", "fedavg_lr", "wait_clients_s", "round_timeout_s"):
        if getattr(f, key) <= 0:
            raise ConfigError(f"federated.{key}: expected a positive number")
    if f.catch_up_limit < 0:
        raise ConfigError("federated.catch_up_limit: expected a non-negative integer")


def fields_help() -> str:
    """Every config field as `--section.key` with its type, default and help, for --help."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            kind = str(hints[f.name]).replace("typing.", "")
            kind = getattr(hints[f.name], "__name__", kind) if "[" not in kind else kind
            lines.append(
                f"  --{section.name}.{f.name} ({kind}, default {default!r})\n"
                f"      {f.metadata.get('help', '')}"
            )
    return "\n".join(lines)
