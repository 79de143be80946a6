"""Sequential randomized gradient estimation (MeZO's SPSA for q=1): 2q forward passes of batch b,
z regenerated from the seed for every pass. Works for LoRA-FA, LoRA and full-parameter training."""

from __future__ import annotations

import torch

from zotune.adapters.full import FullParams
from zotune.estimators.prge import replica_losses
from zotune.estimators.zo import draw, momentum_buffers, projected_gradient, update_from_seed
from zotune.loss import per_replica


class RGE:
    def __init__(self, model, params, loss, q: int, noise: str = "normal", momentum: float = 0.0):
        self.model, self.params, self.loss = model, params, loss
        self.q, self.noise, self.momentum = q, noise, momentum
        self.velocity = momentum_buffers(params.tensors(), momentum)

    def _loss(self, seed: torch.Tensor, query: int, sign: int, eps: float, batch) -> torch.Tensor:
        if isinstance(self.params, FullParams):
            with self.params.perturbed(seed, query, sign * eps, self.noise):
                return per_replica(*self.loss.rows(self.model, *batch), 1)[0]
        # One replica: the adapter computes with B + sign * eps * z_query, never writing B.
        def z_of(t):
            return draw(seed, [t], self.params.numel, self.q, self.noise, query=query)[0]
        return replica_losses(self.model, self.params, self.loss, z_of, 1, eps, (sign,), batch)[0]

    @torch.no_grad()
    def step(self, batch, seed: int, lr: float, eps: float):
        seed_t = torch.tensor([seed], dtype=torch.int64)
        plus, minus = [], []
        for i in range(self.q):
            plus.append(self._loss(seed_t, i, 1, eps, batch))
            minus.append(self._loss(seed_t, i, -1, eps, batch))
        plus, minus = torch.stack(plus), torch.stack(minus)  # [q] each
        g = projected_gradient(plus, minus, eps)
        update_from_seed(self.params.trained, self.params.numel, seed_t, g, lr, self.noise,
                         self.momentum, self.velocity)
        return float(torch.cat([plus, minus]).mean()), g
