"""P-RGE: the q query directions (outer loop) and the +eps/-eps pair (inner loop, `dual`) run as
replicas of one batched forward pass.

`PRGEStep` is the training step itself, written once: eager PyTorch calls it, and the exporters
trace the same module into ExecuTorch and ONNX programs. Its only state is the adapter's trained
tensors (and momentum buffers), updated in place. With `fused_noise` (the exported form) theta,
z and the momentum buffer are handled as flat vectors: one noise call, one perturbed stack and
one update for all layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from zotune.adapters.lora import LoRAAdapter
from zotune.estimators.zo import apply_update, draw, estimate, momentum_buffers, projected_gradient
from zotune.loss import mean_loss, replica_sums
from zotune.rng import noise

# The flat step's momentum buffer [N], registered on the model: every exported method holds the
# model under the same attribute, so train_step and get/set_momentum share it by name.
VELOCITY = "zotune_velocity"


def stacked_losses(
    model,
    adapter: LoRAAdapter,
    loss,
    stacks: dict,
    n_rep: int,
    batch: tuple[torch.Tensor, ...],
    totals: bool = False,
):
    """Per-replica losses of one forward pass with the adapter's layers in replica mode. -> [R]
    With totals: the per-replica loss sums and token counts instead. -> ([R], [R])"""
    # Tile the b examples once per replica: row k*b + i is example i under replica k.
    tiled = [t.repeat(n_rep, *([1] * (t.dim() - 1))) for t in batch]  # [R*b, ...]
    adapter.set_replicas(stacks)
    try:
        nll, count = loss.rows(model, *tiled)  # [R*b]
    finally:
        adapter.set_replicas(None)
    sums, counts = replica_sums(nll, count, n_rep)
    return (sums, counts) if totals else mean_loss(sums, counts)


def perturbed(
    p: torch.Tensor, z: torch.Tensor, eps, signs: tuple[int, ...], buf: torch.Tensor
) -> torch.Tensor:
    """[p + s*eps*z_i for s in signs for i in queries], written into the front of buf (no
    temporaries, no cat). The same bits as `p + (s * eps) * z`. z: [q, *p.shape] -> [R, *p.shape]"""
    q = z.shape[0]
    out = buf[: len(signs) * q * p.numel()].view(len(signs) * q, *p.shape)
    for k, s in enumerate(signs):
        torch.mul(z, s * eps, out=out[k * q : (k + 1) * q]).add_(p)
    return out


def replica_stacks(adapter: LoRAAdapter, z_of, n_query: int, eps, signs: tuple[int, ...]) -> dict:
    """For every layer, a function that builds its perturbed (A, B) stacks, sign-major
    [+z_1..+z_q, -z_1..-z_q], when the layer runs. z_of(tensor name) -> its z [q, *shape].

    Every layer builds into the same buffers, sized for the largest, so a step holds one layer's
    stacks instead of every layer's (SmolLM2 at q=16: 3 MB instead of 320 MB; the step's peak is
    1.04x the inference peak instead of 1.45x, benchmarks/README.md)."""
    n_rep = len(signs) * n_query
    sizes = {
        kind: max(getattr(layer, kind).numel() for layer in adapter.layers.values())
        for kind in ("lora_A", "lora_B")
    }
    like = adapter.tensors()[0]
    b_buf = like.new_empty(n_rep * sizes["lora_B"])
    a_buf = like.new_empty(n_rep * sizes["lora_A"]) if adapter.train_a else None

    def builder(name: str, layer):
        def build():
            b = perturbed(layer.lora_B, z_of(f"{name}.lora_B"), eps, signs, b_buf)
            if a_buf is None:
                return None, b  # [R, d_out, r]
            return perturbed(layer.lora_A, z_of(f"{name}.lora_A"), eps, signs, a_buf), b

        return build

    return {name: builder(name, layer) for name, layer in adapter.layers.items()}


def replica_losses(
    model,
    adapter: LoRAAdapter,
    loss,
    z_of,
    n_query: int,
    eps,
    signs: tuple[int, ...],
    batch: tuple[torch.Tensor, ...],
    totals: bool = False,
):
    """Losses of len(signs) * n_query replicas (sign-major). -> [R] (totals: sums, counts)"""
    stacks = replica_stacks(adapter, z_of, n_query, eps, signs)
    return stacked_losses(model, adapter, loss, stacks, len(signs) * n_query, batch, totals)


def flat_replica_losses(
    model,
    adapter: LoRAAdapter,
    loss,
    theta: torch.Tensor,
    z: torch.Tensor,
    eps,
    signs: tuple[int, ...],
    batch: tuple[torch.Tensor, ...],
    totals: bool = False,
):
    """replica_losses with theta [N] and z [q, N] flat: one perturbed stack [R, N] sliced per
    layer. The same values as the per-layer stacks, in far fewer graph ops (one add per sign
    instead of one per layer), which is what export and lowering time scale with."""
    stack = torch.cat([theta + (s * eps) * z for s in signs])  # [R, N]
    n_rep = stack.shape[0]
    parts = adapter.layout.views(stack)  # name -> [R, *shape]
    stacks = {name: (parts.get(f"{name}.lora_A"), parts[f"{name}.lora_B"]) for name in adapter.layers}
    return stacked_losses(model, adapter, loss, stacks, n_rep, batch, totals)


def flat_update(
    theta: torch.Tensor,
    z: torch.Tensor,
    g: torch.Tensor,
    lr,
    momentum: float = 0.0,
    velocity: torch.Tensor | None = None,
) -> torch.Tensor:
    """theta [N] after one ZO-SGD step from z [q, N] and g [q]; with momentum the heavy-ball
    buffer velocity [N] is updated in place. The same elementwise ops as apply_update (per
    tensor), so the same bits. -> new theta [N]"""
    grad = estimate(z, g)  # [N]
    if momentum > 0:
        velocity.mul_(momentum).add_(grad)
        grad = velocity
    return theta - lr * grad


class PRGEStep(nn.Module):
    """train_step(seed, lr, eps, *batch) -> (mean loss, g[q]); updates the adapter in place.

    One process evaluates all q queries on its batch. A rank of a distributed run
    (train/distributed.py) evaluates only `queries` = [lo, hi) (query-parallel) or only its slice
    of the batch (data-parallel), and `reduce` combines what the ranks measured: it takes this
    process's per-replica loss sums and token counts (sign-major, 2 * (hi - lo) each) and returns
    all 2q losses, the same on every rank. z is drawn from the seed for all q queries either way:
    the update needs every z_i, and nothing but losses crosses the wire."""

    def __init__(
        self,
        model: nn.Module,
        adapter: LoRAAdapter,
        loss,
        q: int,
        dual: bool = True,
        noise: str = "normal",
        momentum: float = 0.0,
        fused_noise: bool = False,
        queries: tuple[int, int] | None = None,
        reduce=mean_loss,
    ):
        super().__init__()
        self.model, self.adapter, self.loss = model, adapter, loss
        self.q, self.dual, self.noise, self.fused_noise = q, dual, noise, fused_noise
        self.momentum = momentum
        self.queries, self.reduce = queries or (0, q), reduce
        self.velocity = None if fused_noise else momentum_buffers(adapter.tensors(), momentum)
        if fused_noise and momentum > 0:
            if not hasattr(model, VELOCITY):
                model.register_buffer(VELOCITY, adapter.tensors()[0].new_zeros(adapter.numel))
            # [N]; per-tensor views of it, for checkpoints
            self.velocity = list(adapter.layout.views(getattr(model, VELOCITY)).values())

    @torch.no_grad()
    def forward(
        self, seed: torch.Tensor, lr: torch.Tensor, eps: torch.Tensor, *batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.draw_noise(seed)
        losses = self.losses(z, eps, *batch)  # [2q]
        g = projected_gradient(losses[: self.q], losses[self.q :], eps)  # [q]
        self.update(z, g, lr)
        return losses.mean(), g

    # The three parts of a step, also called one by one where g is accumulated over micro-batches
    # (zotune.api): the same z for every micro-batch, one update at the end. Each reads the
    # trained tensors when called: under tracing they are the traced buffers.

    def draw_noise(self, seed: torch.Tensor):
        """The step's z for all q queries: (theta [N], z [q, N]) in the flat form, else
        {tensor name: z [q, *shape]}."""
        layout, tensors = self.adapter.layout, self.adapter.tensors()
        if self.fused_noise:  # the exported form
            theta = layout.gather(tensors)  # [N]
            z = noise(seed, 0, self.q * layout.numel, self.noise, theta.dtype, theta.device)
            return theta, z.reshape(self.q, -1)  # [q, N]
        # One draw over [0, q*N), viewed per tensor: the same bits as per-tensor draws, hashed on
        # every thread.
        return dict(zip(layout.names, draw(seed, layout, tensors[0], self.q, self.noise, fused=True)))

    @torch.no_grad()
    def losses(self, z, eps, *batch: torch.Tensor) -> torch.Tensor:
        """Losses of the 2q replicas, sign-major [+z_1..+z_q, -z_1..-z_q], as `reduce` combines
        this process's queries [lo, hi) (and batch) with the other ranks'. -> [2q]"""
        args = (self.model, self.adapter, self.loss)
        lo, hi = self.queries
        own = (lo, hi) != (0, self.q)  # a query-parallel rank: its queries only
        if self.fused_noise:
            theta, flat_z = z
            z_own = flat_z[lo:hi] if own else flat_z  # [k, N], k = hi - lo

            def totals_for(signs):
                return flat_replica_losses(*args, theta, z_own, eps, signs, batch, totals=True)
        else:
            z_own = {name: (t[lo:hi] if own else t) for name, t in z.items()}

            def totals_for(signs):
                return replica_losses(*args, z_own.__getitem__, hi - lo, eps, signs, batch, totals=True)

        if self.dual:
            sums, counts = totals_for((1, -1))  # [2k] each
        else:
            (s_plus, c_plus), (s_minus, c_minus) = totals_for((1,)), totals_for((-1,))
            sums, counts = torch.cat([s_plus, s_minus]), torch.cat([c_plus, c_minus])  # [2k]
        return self.reduce(sums, counts)  # [2q]

    @torch.no_grad()
    def update(self, z, g: torch.Tensor, lr) -> None:
        """ZO-SGD (with momentum) along (1/q) sum_i g_i z_i, in place."""
        layout, tensors = self.adapter.layout, self.adapter.tensors()
        if self.fused_noise:
            theta, flat_z = z
            new = flat_update(theta, flat_z, g, lr, self.momentum, getattr(self.model, VELOCITY, None))
            layout.scatter(new, tensors)
        else:
            apply_update(
                tensors, (estimate(z[name], g) for name in layout.names), lr, self.momentum, self.velocity
            )
