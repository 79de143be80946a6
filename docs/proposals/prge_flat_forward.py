# Proposed replacement for PRGEStep.forward in src/zotune/estimators/prge.py (fused_noise path).
import torch
from zotune.estimators.prge import PRGEStep, replica_losses
from zotune.estimators.zo import apply_update, draw, estimate, projected_gradient
from zotune.loss import per_replica
from zotune.rng import noise as draw_noise


def flat_replica_losses(model, adapter, loss, theta, z, eps, signs, batch):
    """replica_losses with theta and z as flat [N] / [q, N] tensors: one perturbed stack
    [R, N], sliced per layer (bitwise the same values as the per-layer stacks)."""
    stack = torch.cat([theta + (s * eps) * z for s in signs])  # [R, N]
    n_rep = stack.shape[0]
    parts = {t.name: stack[:, t.offset: t.offset + t.tensor.numel()].reshape(n_rep, *t.tensor.shape)
             for t in adapter.trained}
    stacks = {name: (parts.get(f"{name}.lora_A"), parts[f"{name}.lora_B"])
              for name in adapter.layers}
    tiled = [b.repeat(n_rep, *([1] * (b.dim() - 1))) for b in batch]
    adapter.set_replicas(stacks)
    try:
        nll, count = loss.rows(model, *tiled)
    finally:
        adapter.set_replicas(None)
    return per_replica(nll, count, n_rep)


@torch.no_grad()
def forward(self, seed, lr, eps, *batch):
    trained = self.adapter.trained
    if self.fused_noise and self.buffers is None:
        theta = torch.cat([t.tensor.reshape(-1) for t in trained])  # [N]
        z = draw_noise(seed, 0, self.q * self.adapter.numel, self.noise, theta.dtype)
        z = z.reshape(self.q, -1)  # [q, N]
        args = (self.model, self.adapter, self.loss, theta, z, eps)
        if self.dual:
            losses = flat_replica_losses(*args, (1, -1), batch)
        else:
            losses = torch.cat([flat_replica_losses(*args, (1,), batch),
                                flat_replica_losses(*args, (-1,), batch)])
        g = projected_gradient(losses[: self.q], losses[self.q:], eps)
        new = theta - lr * estimate(z, g)  # elementwise: the same bits as t.sub_(lr * grad)
        for t in trained:
            t.tensor.copy_(new[t.offset: t.offset + t.tensor.numel()].reshape(t.tensor.shape))
        return losses.mean(), g
    return ORIGINAL(self, seed, lr, eps, *batch)


ORIGINAL = PRGEStep.forward
