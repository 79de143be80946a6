"""The Python API: run zotune from a script, or bring your own model and loop.

    import zotune
    summary = zotune.train("configs/demo.yaml", train={"steps": 50})
    metrics = zotune.evaluate("configs/demo.yaml", adapter="runs/demo/adapter")

    est = zotune.PRGE(model, loss_fn, q=4, eps=1e-2, lr=1e-4)   # model: PEFT LoRA, zotune LoRA, or plain
    loss, g = est.step(batch)                                     # one P-RGE step
    for micro in chunks: est.accumulate(micro)                    # or: g over micro-batches ...
    loss, g = est.apply()                                         # ... then one update

The estimator runs zotune's own step (estimators/prge.py PRGEStep: z drawn from the step's seed, all
2q perturbed replicas of the batch in one forward pass, ZO-SGD with optional momentum). What it
adds is the bridge to other models:
- PEFT models: each of PEFT's LoRA linears is driven by a zotune LoRALinear that shares its A, B,
  scaling and dropout; during the replica pass the PEFT layer's forward is routed through it.
- Half-precision models: P-RGE's update lr * g * z is far below a bf16 B's resolution, so the
  estimator keeps an fp32 master copy of every trained tensor, perturbs and updates that, and
  copies it (rounded) into the model after each update. The replicas' stacks are cast to the
  model's dtype inside the layers.
- Your loss: loss_fn(model, batch) -> one loss per example, shape [n]. The batch (a tensor, a
  tuple/list or a dict of tensors, examples on dim 0) is tiled once per replica before the call,
  so loss_fn sees 2q*b examples and the estimator averages each replica's b.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from zotune.adapters.lora import LoRAAdapter, LoRALinear
from zotune.adapters.theta import FixedTensors
from zotune.cli import read_config
from zotune.config import Config, _set, validate
from zotune.config import load_config as _load_config
from zotune.errors import ConfigError, ZotuneError
from zotune.estimators.prge import PRGEStep
from zotune.estimators.zo import projected_gradient
from zotune.rng import step_seed

HALF = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- config-driven runs


def _apply(cfg: Config, overrides: dict, source: str) -> None:
    """{"optim.lr": 1e-3} / {"optim__lr": 1e-3} / {"optim": {"lr": 1e-3}} set on cfg, type-checked."""
    for key, value in overrides.items():
        if isinstance(value, dict) and "." not in key and "__" not in key:
            _apply(cfg, {f"{key}.{k}": v for k, v in value.items()}, source)
        else:
            _set(cfg, key.replace("__", "."), value, source)


def load_config(config: str | Path | Config | dict | None = None, **overrides) -> Config:
    """A Config from a YAML path, a dict of sections, an existing Config (copied) or the defaults,
    then overrides given as section.key / section__key keywords or section dicts."""
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif isinstance(config, dict):
        cfg = _load_config(None)
        _apply(cfg, config, "config")
    elif config is None or isinstance(config, (str, Path)):
        cfg = read_config(None if config is None else str(config), [])
    else:
        raise ConfigError(f"expected a YAML path, a dict or a Config, got {type(config).__name__}")
    _apply(cfg, overrides, "override")
    validate(cfg)
    return cfg


def train(
    config: str | Path | Config | dict | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **overrides,
) -> dict:
    """Train as `zotune train` does (resume / overwrite as --resume / --overwrite); -> the run
    summary (also in <out_dir>/summary.json)."""
    from zotune.train.run import train as _train

    return _train(load_config(config, **overrides), resume=resume, overwrite=overwrite)


def evaluate(
    config: str | Path | Config | dict | None = None,
    adapter: str | Path | None = None,
    split: str = "test",
    **overrides,
) -> dict:
    """Evaluate the config's model, with a PEFT adapter folder if given, on a split."""
    from zotune.train.run import evaluate_adapter

    cfg = load_config(config, **overrides)
    return evaluate_adapter(cfg, None if adapter is None else str(adapter), split)


# ----------------------------------------------------------------------------- the estimator


def _peft_layers(model: nn.Module, train_a: bool) -> dict[str, tuple[nn.Module, LoRALinear]]:
    """name -> (PEFT LoRA linear, a zotune LoRALinear sharing its tensors), for the active adapter."""
    try:
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return {}
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, PeftLinear):
            continue
        if mod.merged:
            raise ZotuneError(f"PEFT layer {name} is merged; unmerge the adapter before training it")
        active = [a for a in mod.active_adapters if a in mod.lora_A]
        if len(active) != 1:
            raise ZotuneError(f"PEFT layer {name}: expected one active LoRA adapter, got {active}")
        key = active[0]
        a, b = mod.lora_A[key].weight, mod.lora_B[key].weight  # [r, d_in], [d_out, r]
        view = LoRALinear(
            mod.base_layer, a.shape[1], b.shape[0], a.shape[0], 1.0, 0.0, train_a, torch.Generator()
        )
        view.lora_A, view.lora_B = a, b  # the PEFT parameters themselves
        view.scale, view.dropout = mod.scaling[key], mod.lora_dropout[key]
        out[name] = (mod, view)
    return out


class _Trained(FixedTensors):
    """What PRGEStep needs of an adapter, over zotune or PEFT layers: the trained tensors (fp32
    masters for half-precision models) with their theta layout, and the switch into replica mode."""

    def __init__(self, layers: dict[str, LoRALinear], train_a: bool, peft: dict | None = None):
        self.real, self.train_a, self.peft = layers, train_a, peft or {}
        self.layers, named, self._pairs = {}, [], []
        for name, layer in layers.items():
            views = {}
            for kind in ("lora_A", "lora_B"):
                t = getattr(layer, kind).detach()
                trained = kind == "lora_B" or train_a
                if trained and t.dtype in HALF:
                    master = t.float().clone()
                    self._pairs.append((master, t))
                    t = master
                views[kind] = t
                if trained:
                    named.append((f"{name}.{kind}", t))
            self.layers[name] = SimpleNamespace(**views)
        self._lay_out(named)

    def describe(self) -> dict:
        return {
            "kind": "lora" if self.train_a else "lora-fa",
            "peft": bool(self.peft),
            "layers": [[name, layer.d_in, layer.d_out] for name, layer in self.real.items()],
        }

    @property
    def master(self) -> bool:
        return bool(self._pairs)

    def set_replicas(self, stacks: dict | None) -> None:
        for name, layer in self.real.items():
            layer.replicas = None if stacks is None else stacks[name]
            if name in self.peft:  # route the PEFT layer through the zotune view for this pass
                mod = self.peft[name]
                if stacks is None:
                    mod.__dict__.pop("forward", None)
                else:
                    mod.forward = layer.forward

    @torch.no_grad()
    def sync(self) -> None:
        """Masters -> the model's half-precision tensors."""
        for master, t in self._pairs:
            t.copy_(master)


class _ClosureLoss:
    """A user's loss_fn as a zotune loss: rows(model, *tensors) -> (loss per row, count per row)."""

    def __init__(self, loss_fn, rebuild):
        self.loss_fn, self.rebuild = loss_fn, rebuild

    def rows(self, model, *tensors):
        out = self.loss_fn(model, self.rebuild(tensors))
        n = tensors[0].shape[0]
        if not torch.is_tensor(out) or out.dim() != 1 or out.shape[0] != n:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ZotuneError(
                f"loss_fn must return one loss per example, shape [{n}] for this batch "
                f"(use reduction='none' and average over each example's tokens); got {got}"
            )
        out = out.float() if out.dtype in HALF else out
        return out, torch.ones_like(out)


def _flatten(batch):
    """batch -> (tensors, function that rebuilds the batch's structure from tensors)."""
    if torch.is_tensor(batch):
        return (batch,), lambda ts: ts[0]
    if isinstance(batch, dict):
        keys = list(batch)
        return tuple(batch[k] for k in keys), lambda ts: dict(zip(keys, ts))
    if isinstance(batch, (tuple, list)):
        kind = type(batch)
        return tuple(batch), lambda ts: kind(ts)
    raise ZotuneError(
        f"batch must be a tensor, a tuple/list or a dict of tensors, got {type(batch).__name__}"
    )


class PRGE:
    """One P-RGE step at a time on any model with LoRA layers, in your own loop.

    model: a PEFT model (peft.get_peft_model / LoraModel) with LoRA linears, a model with zotune
    adapters (pass `adapter=` the LoRAAdapter), or a plain model (zotune adds LoRA-FA adapters:
    rank, alpha, targets). Only B is trained (LoRA-FA) unless train_a. loss_fn(model, batch) returns
    one loss per example. Seeds follow zotune.rng.step_seed(seed, step), so the run is replayable
    from `history` (seed, g, lr per step).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        *,
        q: int = 4,
        eps: float = 1e-2,
        lr: float = 1e-4,
        momentum: float = 0.0,
        dual: bool = True,
        noise: str = "normal",
        seed: int = 0,
        train_a: bool = False,
        adapter: LoRAAdapter | None = None,
        rank: int = 16,
        alpha: float = 32.0,
        targets: list[str] | None = None,
    ):
        if q < 1 or eps <= 0:
            raise ConfigError(f"PRGE: expected q >= 1 and eps > 0, got q={q}, eps={eps}")
        self.model, self.loss_fn = model, loss_fn
        self.q, self.eps, self.lr, self.seed = q, eps, lr, seed
        peft = _peft_layers(model, train_a) if adapter is None else {}
        if adapter is not None:
            layers = adapter.layers
        elif peft:
            layers = {name: view for name, (_, view) in peft.items()}
        elif any(isinstance(m, LoRALinear) for m in model.modules()):
            raise ZotuneError("the model has zotune LoRA layers: pass their LoRAAdapter as adapter=")
        else:
            adapter = LoRAAdapter(
                model, rank=rank, alpha=alpha, targets=targets or ["all-linear"], train_a=train_a
            )
            layers = adapter.layers
        self.adapter = adapter  # the zotune adapter, when zotune's layers are used
        self.params = _Trained(layers, train_a, {n: mod for n, (mod, _) in peft.items()})
        device = self.params.tensors()[0].device
        self._step = PRGEStep(
            model, self.params, None, q, dual, noise, momentum, fused_noise=device.type != "cpu"
        )
        self.steps = 0
        self.history: list[dict] = []
        self._pending = None  # (z, seed, sum of per-replica losses weighted by examples, examples)

    @property
    def numel(self) -> int:
        return self.params.numel

    def accumulate(self, batch) -> float:
        """Evaluate the 2q replicas on a micro-batch with this step's z; -> its mean loss."""
        tensors, rebuild = _flatten(batch)
        self._step.loss = _ClosureLoss(self.loss_fn, rebuild)
        if self._pending is None:
            seed = step_seed(self.seed, self.steps)
            seed_t = torch.tensor([seed], dtype=torch.int64)
            self._pending = [self._step.draw_noise(seed_t), seed, 0.0, 0]
        n = tensors[0].shape[0]
        losses = self._step.losses(self._pending[0], self.eps, *tensors)  # [2q]
        self._pending[2] = self._pending[2] + losses.double() * n
        self._pending[3] += n
        return float(losses.mean())

    def apply(self, lr: float | None = None) -> tuple[float, torch.Tensor]:
        """One update from the accumulated micro-batches; -> (mean loss, g [q])."""
        if self._pending is None:
            raise ZotuneError("PRGE.apply: no accumulated batch (call accumulate(batch) first)")
        z, seed, total, n = self._pending
        self._pending = None
        like = self.params.tensors()[0]
        losses = (total / n).to(like.dtype)  # [2q]: each replica's mean over all examples
        g = projected_gradient(losses[: self.q], losses[self.q :], self.eps)  # [q]
        lr = self.lr if lr is None else lr
        self._step.update(z, g, lr)
        self.params.sync()
        self.history.append(
            {"step": self.steps, "seed": seed, "lr": lr, "eps": self.eps, "g": [float(x) for x in g]}
        )
        self.steps += 1
        return float(losses.mean()), g

    def step(self, batch, lr: float | None = None) -> tuple[float, torch.Tensor]:
        """accumulate(batch) then apply(): one P-RGE step. -> (mean loss, g [q])"""
        self.accumulate(batch)
        return self.apply(lr)

    def state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (fp32 masters where the model is half precision), by name."""
        return {n: t.detach().clone() for n, t in self.params.named_tensors()}
