"""The pieces every zeroth-order estimator shares: drawing z for the trained tensors, turning
loss pairs into projected gradients, and the ZO-SGD update (optionally with momentum).

theta is the concatenation of the trained tensors (flattened, in adapter order). Query i uses the
counters [i * N, (i + 1) * N) of the step's stream, so z is the same whichever way it is drawn:
per tensor (eager: small temporaries) or in one call sliced afterwards (exported programs: one
op chain instead of one per layer).
"""

from __future__ import annotations

import torch

from zotune.adapters.lora import TrainedTensor
from zotune.rng import noise, noise_at


def draw(seed: torch.Tensor, trained: list[TrainedTensor], numel: int, q: int, kind: str,
         fused: bool = False, query: int | None = None) -> list[torch.Tensor]:
    """z for every trained tensor: a list of [q, *shape] tensors, or [1, *shape] for one query."""
    if fused:
        dtype, device = trained[0].tensor.dtype, trained[0].tensor.device
        z = noise(seed, 0, q * numel, kind, dtype, device).reshape(q, numel)  # [q, N]
        return [z[:, t.offset: t.offset + t.tensor.numel()].reshape(q, *t.tensor.shape)
                for t in trained]
    out = []
    device = trained[0].tensor.device
    ids = torch.arange(q, device=device) if query is None else torch.tensor([query], device=device)
    queries = ids.to(torch.int64).unsqueeze(1) * numel  # [q, 1]
    for t in trained:
        n = t.tensor.numel()
        index = queries + t.offset + torch.arange(n, dtype=torch.int64, device=device)  # [q, n]
        out.append(noise_at(seed, index, kind, t.tensor.dtype).reshape(-1, *t.tensor.shape))
    return out


def projected_gradient(loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps) -> torch.Tensor:
    """g_i = (l+_i - l-_i) / (2 eps). -> [q]"""
    return (loss_plus - loss_minus) / (2 * eps)


def estimate(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(1/q) sum_i g_i z_i for one tensor. z: [q, *shape], g: [q].

    Accumulated in a fixed order with elementwise ops, so the result does not depend on how the
    tensors are chunked: training and replay give the same bits."""
    acc = z[0] * g[0].to(z.dtype)
    for i in range(1, z.shape[0]):
        acc = acc + z[i] * g[i].to(z.dtype)
    return acc / z.shape[0]


@torch.no_grad()
def apply_update(tensors: list[torch.Tensor], grads, lr, momentum: float = 0.0,
                 buffers: list[torch.Tensor] | None = None) -> None:
    """ZO-SGD: theta <- theta - lr * grad, with heavy-ball momentum when buffers are given.
    grads may be a list or a generator (full-parameter mode draws z one tensor at a time)."""
    for i, (t, grad) in enumerate(zip(tensors, grads)):
        if buffers is not None:
            buffers[i].mul_(momentum).add_(grad)
            grad = buffers[i]
        t.sub_(lr * grad)


def momentum_buffers(tensors: list[torch.Tensor], momentum: float) -> list[torch.Tensor] | None:
    return [torch.zeros_like(t) for t in tensors] if momentum > 0 else None


def update_from_seed(trained: list[TrainedTensor], numel: int, seed: torch.Tensor, g: torch.Tensor,
                     lr, kind: str, momentum: float = 0.0,
                     buffers: list[torch.Tensor] | None = None) -> None:
    """The update of one step rebuilt from (seed, g) alone, drawing z one tensor at a time.
    Used by sequential RGE and by replay; the same bits as an update from z drawn in one go."""
    grads = (estimate(draw(seed, [t], numel, g.shape[0], kind)[0], g) for t in trained)
    apply_update([t.tensor for t in trained], grads, lr, momentum, buffers)
