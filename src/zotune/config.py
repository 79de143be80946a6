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

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # embedded name, local folder, .gguf file, or hub id
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    task: str = "bigbench:multiemo"  # bigbench:<name>, jsonl:<path>, mezo:<name>:<path>
    labels: list[str] | None = None  # keep only examples whose label is one of these
    label_words: dict[str, str] | None = None  # label -> verbalizer word (classification)
    template: str | None = None  # prompt template with {input}
    train_size: int = 1000
    dev_size: int = 200
    test_size: int = 500
    max_input_chars: int | None = None  # drop examples with longer inputs
    split_seed: int = 0
    max_length: int = 64  # static sequence length (left padding, prompt truncated on the left)
    max_target_length: int = 16  # static completion length for generation tasks


@dataclass
class AdapterConfig:
    kind: str = "lora-fa"  # lora-fa | lora | full
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    init_seed: int = 0


@dataclass
class OptimConfig:
    estimator: str = "prge"  # prge | rge | fo
    q: int = 4  # query directions per step
    batch_size: int = 4  # distinct examples per step (b)
    dual: bool = True  # prge: +eps and -eps replicas in the same forward pass
    eps: float = 1e-2
    lr: float = 3e-3
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    momentum: float = 0.0  # ZO-SGD heavy-ball momentum on the estimated gradient
    noise: str = "normal"  # normal (Irwin-Hall) | rademacher
    optimizer: str = "adamw"  # fo only: sgd | adamw
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 0
    eval_every: int = 50
    checkpoint_every: int = 50
    log_every: int = 1
    eval_batch_size: int = 32
    time_limit_s: float | None = None  # stop once this much training time (evals excluded) is spent
    track_test: bool = False  # also score test at every dev eval, for curves only (selection stays on dev)
    out_dir: str = "runs/default"
    threads: int | None = None
    progress: bool = True
    # Under torchrun: how a step is split over the ranks (train/distributed.py). One process
    # ignores it, so a distributed run resumes on any number of ranks.
    parallel: str = "none"  # none | data | query
    dist_timeout_s: float = 300.0  # a collective that waits longer than this is an error


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

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
        raise ConfigError(
            f"{source}: unknown key '{section_name}.{key}' (expected one of {sorted(hints)})")
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
    ("optim", "optimizer"): ("sgd", "adamw"),
    ("model", "dtype"): ("float32", "float64", "bfloat16", "float16"),
    ("train", "parallel"): ("none", "data", "query"),
}


def validate(cfg: Config) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}: expected one of {list(allowed)}, got '{value}'")
    for section, key in (("optim", "q"), ("optim", "batch_size"), ("adapter", "rank"),
                         ("data", "max_length"), ("train", "eval_batch_size")):
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"{section}.{key}: expected a positive integer")
    if cfg.optim.eps <= 0:
        raise ConfigError("optim.eps: expected a positive number")
    if cfg.train.dist_timeout_s <= 0:
        raise ConfigError("train.dist_timeout_s: expected a positive number")
    if cfg.train.steps < 0:
        raise ConfigError("train.steps: expected a non-negative integer")
    if cfg.adapter.kind == "full" and cfg.optim.estimator == "prge":
        raise ConfigError("optim.estimator: prge needs an adapter (adapter.kind lora-fa or lora); "
                          "use rge for full-parameter ZO")
