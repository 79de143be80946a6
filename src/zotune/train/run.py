"""What `zotune train`, `eval` and `replay` do: wire config, model, data and engine together."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from zotune import __version__
from zotune.adapters.full import FullParams
from zotune.adapters.peft_io import load_peft, save_peft, save_peft_described
from zotune.checks import all_finite
from zotune.config import Config
from zotune.data import load_task
from zotune.data.choice import resolve_kind
from zotune.data.tokenize import encode
from zotune.engines.eager import EagerEngine
from zotune.errors import ZotuneError, reading
from zotune.eval import evaluate
from zotune.eval_generate import judge_generation, judgeable
from zotune.models import load_model
from zotune.replay import header_layout, read_replay_log, replay_lora, replay_steps
from zotune.train import distributed
from zotune.train.loop import Splits, Trainer
from zotune.train.rundir import check_run_dir


def set_threads(cfg: Config) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def prepare(cfg: Config):
    """-> (model, tokenizer, tokenised splits)."""
    set_threads(cfg)
    model, tokenizer, _ = load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code)
    return model, tokenizer, encode_splits(cfg, tokenizer)


def encode_splits(cfg: Config, tokenizer) -> Splits:
    """The task's three splits, tokenised to the config's static shapes."""
    task = load_task(cfg.data)
    d = cfg.data
    # Multiple choice whose choices are not all single tokens is scored as token sequences.
    kind = resolve_kind(task.kind, task.train + task.dev + task.test, tokenizer)

    def tok(examples):
        return encode(examples, tokenizer, d.max_length, d.max_target_length, kind, d.length_normalize)

    return Splits(
        kind,
        tok(task.train),
        tok(task.dev),
        tok(task.test),
        examples={"train": task.train, "dev": task.dev, "test": task.test},
    )


def adapter_saver(cfg: Config, engine):
    """A function (state, folder) that writes the trained weights: PEFT format for adapters,
    a safetensors model folder for full-parameter runs."""
    params = engine.params

    def save(state: dict[str, torch.Tensor], folder: Path) -> None:
        if isinstance(params, FullParams):
            engine.model.save_pretrained(folder, safe_serialization=True)
            return
        save_peft(
            folder,
            state,
            list(params.layers),
            params.rank,
            params.alpha,
            cfg.model.name,
            params.fan_in_fan_out,
            cfg.adapter.dropout,
            extra={"version": __version__, "kind": cfg.adapter.kind, "estimator": cfg.optim.estimator},
        )

    return save


def replay_header(cfg: Config, params) -> dict:
    o = cfg.optim
    header = {
        "version": __version__,
        "model": cfg.model.name,
        "estimator": o.estimator,
        "q": o.q,
        "noise": o.noise,
        "momentum": o.momentum,
        "adapter_kind": cfg.adapter.kind,
    }
    header["layout"] = params.layout.to_json()
    return header


def generation_judge(cfg: Config, model, tokenizer, splits: Splits):
    """split name -> generation metrics, for generation and chat tasks whose examples have prompts;
    None otherwise (scored by loss only)."""
    if splits.kind not in ("generation", "chat") or not judgeable(splits.examples["dev"]):
        return None
    d, t = cfg.data, cfg.train

    def judge(split: str) -> dict:
        return judge_generation(
            model,
            tokenizer,
            splits.examples[split],
            splits.kind,
            d.max_length,
            d.max_target_length,
            t.eval_batch_size,
            t.progress,
        )

    return judge


def train(
    cfg: Config, resume: bool = False, stop_after: int | None = None, overwrite: bool = False
) -> dict | None:
    """resume: continue the run in train.out_dir; overwrite: replace it (train/rundir.py)."""
    if distributed.world_size() > 1:  # one rank of a torchrun job
        return distributed.train(cfg, resume, stop_after, overwrite)
    check_run_dir(cfg, resume, overwrite)  # before any model or data loads
    model, tokenizer, splits = prepare(cfg)
    engine = EagerEngine(model, cfg, splits.kind)
    trainer = Trainer(
        cfg,
        engine,
        splits,
        Path(cfg.train.out_dir),
        adapter_saver(cfg, engine),
        replay_header(cfg, engine.params),
        judge=generation_judge(cfg, model, tokenizer, splits),
    )
    return trainer.run(resume=resume, stop_after=stop_after)


def adapter_shape(cfg: Config, config: dict, adapter_dir: str) -> Config:
    """cfg with the adapter's own rank and lora_alpha (its adapter_config.json): the scale
    alpha / r an adapter was trained with is part of its weights' meaning."""
    where = f"{Path(adapter_dir) / 'adapter_config.json'}"
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ZotuneError(f"{where}: field 'r': expected a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not all_finite(alpha) or alpha <= 0:
        raise ZotuneError(f"{where}: field 'lora_alpha': expected a positive number, got {alpha!r}")
    if config.get("use_rslora"):
        raise ZotuneError(f"{where}: field 'use_rslora': rank-stabilised scaling is not supported")
    return dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, rank=r, alpha=float(alpha)))


def evaluate_adapter(cfg: Config, adapter_dir: str | None, split: str = "test") -> dict:
    """The config's model, with the adapter in adapter_dir (its own rank and alpha), on a split."""
    if adapter_dir:
        config, state = load_peft(adapter_dir)  # before the model loads: a bad folder fails fast
        cfg = adapter_shape(cfg, config, adapter_dir)
    model, tokenizer, splits = prepare(cfg)
    engine = EagerEngine(model, cfg, splits.kind)
    if adapter_dir:
        want = engine.params.state()
        missing = sorted(set(want) - set(state))
        if missing:
            raise ZotuneError(
                f"{adapter_dir}: no tensor for layer {missing[0]} "
                f"(was it trained with other adapter.targets?)"
            )
        wrong = [k for k in sorted(want) if state[k].shape != want[k].shape]
        if wrong:
            raise ZotuneError(
                f"{adapter_dir}: tensor {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model "
                f"and r={cfg.adapter.rank} need {tuple(want[wrong[0]].shape)}"
            )
        engine.params.load_state(state)
    result = evaluate(engine, getattr(splits, split), splits.kind, cfg.train.eval_batch_size)
    judge = generation_judge(cfg, model, tokenizer, splits)
    if judge is not None:
        result.update(judge(split))
    return {k: v for k, v in result.items() if k != "logits"}


def replay(log_path: str, out_dir: str) -> Path:
    header, steps = read_replay_log(log_path)
    layout = header_layout(header, log_path)
    if header["adapter_kind"] == "full":
        model, _, _ = load_model(header["model"], layout.dtype)
        params = FullParams(model)
        if params.layout.mismatch(layout):
            raise ZotuneError(
                f"{log_path}: the model {header['model']} does not have the "
                f"trained tensors of this log ({params.layout.mismatch(layout)})"
            )
        replay_steps(params.layout, params.tensors(), header, steps)
        model.save_pretrained(out_dir, safe_serialization=True)
        return Path(out_dir)
    with reading(log_path, "a replay log written by zotune (its header's layout describes LoRA tensors)"):
        state = replay_lora(header, steps, f"{log_path}: header")
    extra = {"replayed_from": str(log_path), "steps": len(steps)}
    return save_peft_described(out_dir, state, layout.adapter, header["model"], extra)
