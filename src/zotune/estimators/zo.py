"""The pieces every zeroth-order estimator shares: drawing z for the trained tensors, turning
loss pairs into projected gradients, and the ZO-SGD update (optionally with momentum).

theta is the concatenation of the trained tensors (flattened, in adapter order). Query i uses the
counters [i * N, (i + 1) * N) of the step's stream, so z is the same whichever way it is drawn:
per tensor (eager: small temporaries) or in one call sliced afterwards (exported programs: one
op chain instead of one per layer).
"""

from __future__ import annotations

import torch

from zotune.adapters.theta import ThetaLayout
from zotune.rng import noise, noise_at


def draw(
    seed: torch.Tensor,
    layout: ThetaLayout,
    like: torch.Tensor,
    q: int,
    kind: str,
    fused: bool = False,
    query: int | None = None,
) -> list[torch.Tensor]:
    """z for every trained tensor, in the dtype and on the device of `like`: a list of
    [q, *shape] tensors, or [1, *shape] for one query."""
    if fused:
        z = noise(seed, 0, q * layout.numel, kind, like.dtype, like.device)
        return list(layout.views(z.reshape(q, layout.numel)).values())  # [q, N] viewed
    device = like.device
    ids = torch.arange(q, device=device) if query is None else torch.tensor([query], device=device)
    return [_draw_entry(seed, layout, e, ids, kind, like.dtype) for e in layout]


def _draw_entry(seed, layout: ThetaLayout, e, queries: torch.Tensor, kind: str, dtype):
    """z of one trained tensor for the given queries. -> [len(queries), *e.shape]"""
    return noise_at(seed, layout.counters(e, queries), kind, dtype).reshape(-1, *e.shape)


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
def apply_update(
    tensors: list[torch.Tensor], grads, lr, momentum: float = 0.0, buffers: list[torch.Tensor] | None = None
) -> None:
    """ZO-SGD: theta <- theta - lr * grad, with heavy-ball momentum when buffers are given.
    grads may be a list or a generator (full-parameter mode draws z one tensor at a time)."""
    for i, (t, grad) in enumerate(zip(tensors, grads)):
        if buffers is not None:
            buffers[i].mul_(momentum).add_(grad)
            grad = buffers[i]
        t.sub_(lr * grad)


def momentum_buffers(tensors: list[torch.Tensor], momentum: float) -> list[torch.Tensor] | None:
    return [torch.zeros_like(t) for t in tensors] if momentum > 0 else None


def update_from_seed(
    layout: ThetaLayout,
    tensors: list[torch.Tensor],
    seed: torch.Tensor,
    g: torch.Tensor,
    lr,
    kind: str,
    momentum: float = 0.0,
    buffers: list[torch.Tensor] | None = None,
) -> None:
    """The update of one step rebuilt from (seed, g) alone, drawing z one tensor at a time.
    Used by sequential RGE and by replay; the same bits as an update from z drawn in one go."""
    queries = torch.arange(g.shape[0], device=tensors[0].device)
    grads = (
        estimate(_draw_entry(seed, layout, e, queries, kind, t.dtype), g)
        for e, t in zip(layout, tensors, strict=True)
    )
    apply_update(tensors, grads, lr, momentum, buffers)
