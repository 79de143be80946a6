"""The eager PyTorch engine: runs the estimators directly on a transformers model. It implements
the engine contract (engines/base.py) that the training loop drives."""

from __future__ import annotations

import torch

from zotune.adapters.full import FullParams
from zotune.adapters.lora import LoRAAdapter
from zotune.config import Config
from zotune.engines.base import MOMENTUM, OPT, PARAM, part, prefixed
from zotune.estimators.fo import FirstOrder
from zotune.estimators.prge import PRGEStep
from zotune.estimators.rge import RGE
from zotune.loss import loss_inputs, make_loss, score_outputs, trim_left_padding


def build_params(model, cfg: Config):
    a = cfg.adapter
    if a.kind == "full":
        return FullParams(model)
    return LoRAAdapter(
        model,
        rank=a.rank,
        alpha=a.alpha,
        targets=a.targets,
        dropout=a.dropout,
        train_a=(a.kind == "lora"),
        init_seed=a.init_seed,
    )


class EagerEngine:
    name = "eager"

    def __init__(self, model, cfg: Config, kind: str, step_options: dict | None = None):
        """step_options: PRGEStep's `queries` / `reduce` for one rank of a distributed run."""
        self.model, self.cfg, self.kind = model, cfg, kind
        o = cfg.optim
        self.params = build_params(model, cfg)
        # Full-parameter mode perturbs weights inside module calls, so the head must be called.
        self.loss = make_loss(kind, via_head_module=isinstance(self.params, FullParams))
        if o.estimator == "prge":
            # On an accelerator the flat form (theta and z as [N] / [q, N]: a few large kernels
            # instead of a few per tensor) is the fast one; on the CPU the per-layer form keeps
            # one layer's stacks in memory. Both give the same bits (tests/estimators).
            flat = next(model.parameters()).device.type != "cpu"
            step = PRGEStep(
                model,
                self.params,
                self.loss,
                o.q,
                o.dual,
                o.noise,
                o.momentum,
                fused_noise=flat,
                **(step_options or {}),
            )
            self._step, self.velocity, self._optimizer = self._prge(step), step.velocity, None
        elif o.estimator == "rge":
            rge = RGE(model, self.params, self.loss, o.q, o.noise, o.momentum)
            self._step, self.velocity, self._optimizer = rge.step, rge.velocity, None
        else:
            fo = FirstOrder(model, self.params, self.loss, o.optimizer, o.lr, o.weight_decay, o.momentum)
            self._step, self.velocity, self._optimizer = fo.step, None, fo

    @staticmethod
    def _prge(step: PRGEStep):
        def run(batch, seed, lr, eps):
            loss, g = step(torch.tensor([seed], dtype=torch.int64), lr, eps, *batch)
            return float(loss), g

        return run

    def _trim(self, batch):
        batch = loss_inputs(batch, self.kind)
        # Generation and choice read the last L+1 positions, whatever the padding.
        keep = 1 if self.kind == "classification" else batch.target_ids.shape[-1] + 1
        return trim_left_padding(batch, keep)

    def step(self, batch, seed: int, lr: float, eps: float):
        """-> (mean loss of the step, g[q]) ; updates the trained tensors."""
        return self._step(self._trim(batch), seed, lr, eps)

    @torch.no_grad()
    def scores(self, batch) -> tuple[torch.Tensor, ...]:
        """Classification: choice logits [B, C]. Choice: choice scores [B, C]. Generation and
        chat: (nll sum [B], token count [B])."""
        return score_outputs(self.loss, self.model, self._trim(batch))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        if isinstance(self.params, FullParams):
            return {n: t.detach().clone() for n, t in self.params.named_tensors()}
        return self.params.state()

    def state(self) -> dict[str, torch.Tensor]:
        """Everything a resume needs: trained tensors, momentum, optimizer moments."""
        names = self.params.layout.names
        out = prefixed(dict(self.params.named_tensors()), PARAM)
        out.update(prefixed(dict(zip(names, self.velocity or [])), MOMENTUM))
        if self._optimizer is not None:
            out.update(prefixed(self._optimizer.state(), OPT))
        return out

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, t in self.params.named_tensors():
            t.copy_(tensors[PARAM + n])
        for n, m in zip(self.params.layout.names, self.velocity or []):
            m.copy_(tensors[MOMENTUM + n])
        if self._optimizer is not None:
            self._optimizer.load_state(part(tensors, OPT))
