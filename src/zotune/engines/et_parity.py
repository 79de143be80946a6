"""The check every exported ExecuTorch program passes before it is written: one step and one
forward of the lowered program next to eager PyTorch, from the same theta (and momentum)."""

from __future__ import annotations

import torch

from zotune.adapters.theta import set_theta, theta_of
from zotune.estimators.prge import VELOCITY, flat_update
from zotune.rng import noise as rng_noise

# Parity after one step, max abs differences (the metrics: parity_check). An fp32 program must
# match eager in all of them. An 8da4w program is held to the torchao-quantized eager model in
# the forward logits and the loss at 5e-2 only: with 8-bit dynamic activations a last-bit
# difference upstream flips a rounding downstream, and the flips cascade through the layers (one
# quantized linear agrees to 1.5e-5; SmolLM2's 30 layers end 1.7e-2 apart in relative logits
# and 2.0e-2 in the loss). The loss differences behind g are of that size too, so g and theta
# after a step cannot be compared with eager's; what is checked exactly instead is that the
# program applies the update its own g implies ("update", "momentum").
_EXACT = {"set_get": 1e-5, "update": 1e-5, "momentum": 1e-5}
TOLERANCE = {
    None: {**_EXACT, "forward": 1e-5, "loss": 1e-5, "loss_diff": 1e-5, "theta": 1e-5},
    "8da4w": {**_EXACT, "forward": 5e-2, "loss": 5e-2},
}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


@torch.no_grad()
def parity_check(data: bytes, plan, theta0: torch.Tensor, dtype) -> dict:
    """The lowered program against eager PyTorch from the same (nonzero) theta and momentum.
    plan: the exporter's methods and check inputs (executorch._Plan). -> metric -> max abs diff"""
    from executorch.runtime import Runtime

    step, adapter, loss, model = plan.step, plan.adapter, plan.loss, plan.model
    seed_t, lr_t, eps_t, batch, eval_in = (plan.seed_t, plan.lr_t, plan.eps_t, plan.batch,
                                           plan.eval_in)
    gen = torch.Generator().manual_seed(plan.check_seed)
    theta = (torch.randn(theta0.shape, generator=gen) * 0.02).to(dtype)
    velocity = None
    if plan.momentum:
        gen = torch.Generator().manual_seed(plan.check_seed + 1)
        velocity = (torch.randn(theta0.shape, generator=gen) * 0.1).to(dtype)

    program = Runtime.get().load_program(data)
    methods = {name: program.load_method(name) for name in program.method_names}  # all first
    methods["set_lora"].execute([theta.clone()])
    if velocity is not None:
        methods["set_momentum"].execute([velocity.clone()])
        getattr(model, VELOCITY).copy_(velocity)
    got = methods["get_lora"].execute([])[0]
    logits_pte = methods["forward"].execute(list(eval_in))[0]
    loss_pte, g_pte = methods["train_step"].execute([seed_t, lr_t, eps_t, *batch])
    theta_pte = methods["get_lora"].execute([])[0]

    set_theta(adapter, theta)
    logits_eager = loss.logits(model, *eval_in)
    loss_eager, g_eager = step(seed_t, lr_t, eps_t, *batch)
    theta_eager = theta_of(adapter)

    # The update the program's own g implies, computed in eager from the same z (the RNG is
    # bit-exact): checks the noise, the update and the momentum buffer whatever g came out.
    z = rng_noise(seed_t, 0, step.q * theta.numel(), step.noise, theta.dtype)
    z = z.reshape(step.q, -1)  # [q, N]
    v_expected = None if velocity is None else velocity.clone()
    theta_expected = flat_update(theta, z, g_pte, lr_t, step.momentum, v_expected)
    momentum = {}
    if velocity is not None:
        momentum["momentum"] = _max_diff(methods["get_momentum"].execute([])[0], v_expected)
    return {
        "set_get": _max_diff(got, theta),
        # Logits are compared relative to their scale (real LMs give logits of 10-30).
        "forward": _max_diff(logits_pte, logits_eager)
        / max(1.0, float(logits_eager.abs().max())),
        "loss": _max_diff(loss_pte, loss_eager),
        # g = (l+ - l-) / (2 eps): compare the loss differences it comes from.
        "loss_diff": _max_diff(g_pte * 2 * eps_t, g_eager * 2 * eps_t),
        "theta": _max_diff(theta_pte, theta_eager),
        "update": _max_diff(theta_pte, theta_expected),
        **momentum,
    }
