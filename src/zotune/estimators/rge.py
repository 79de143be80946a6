"""Sequential randomized gradient estimation (MeZO's SPSA for q=1): 2q forward passes of batch b,
z regenerated from the seed for every pass. Works for LoRA-FA, LoRA and full-parameter training."""

from __future__ import annotations

import torch

from zotune.adapters.full import FullParams
from zotune.estimators.prge import replica_losses
from zotune.estimators.zo import momentum_buffers, projected_gradient, update_from_seed
from zotune.loss import per_replica
from zotune.rng import noise


class RGE:
    def __init__(self, model, params, loss, q: int, noise: str = "normal", momentum: float = 0.0):
        self.model, self.params, self.loss = model, params, loss
        self.q, self.noise, self.momentum = q, noise, momentum
        self.velocity = momentum_buffers(params.tensors(), momentum)

    def _loss(
        self, seed: torch.Tensor, query: int, sign: int, eps: float, batch, z_query: torch.Tensor | None
    ) -> torch.Tensor:
        if isinstance(self.params, FullParams):
            with self.params.perturbed(seed, query, sign * eps, self.noise):
                return per_replica(*self.loss.rows(self.model, *batch), 1)[0]
        # One replica: the adapter computes with B + sign * eps * z_query, never writing B.
        z_of = self.params.layout.views(z_query.unsqueeze(0)).__getitem__  # name -> [1, *shape]
        return replica_losses(self.model, self.params, self.loss, z_of, 1, eps, (sign,), batch)[0]

    def _z(self, seed: torch.Tensor, query: int) -> torch.Tensor | None:
        """The query's z for all LoRA tensors [N], drawn once for both signs (full-parameter mode
        draws per tensor inside its modules instead: N is the whole model there)."""
        if isinstance(self.params, FullParams):
            return None
        like, n = self.params.tensors()[0], self.params.numel
        return noise(seed, query * n, n, self.noise, like.dtype, like.device)

    @torch.no_grad()
    def step(self, batch, seed: int, lr: float, eps: float):
        seed_t = torch.tensor([seed], dtype=torch.int64)
        plus, minus = [], []
        for i in range(self.q):
            z = self._z(seed_t, i)
            plus.append(self._loss(seed_t, i, 1, eps, batch, z))
            minus.append(self._loss(seed_t, i, -1, eps, batch, z))
        plus, minus = torch.stack(plus), torch.stack(minus)  # [q] each
        g = projected_gradient(plus, minus, eps)
        update_from_seed(
            self.params.layout, self.params.tensors(), seed_t, g, lr, self.noise, self.momentum, self.velocity
        )
        return float(torch.cat([plus, minus]).mean()), g
