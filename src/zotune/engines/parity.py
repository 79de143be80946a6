"""The check every exported program passes before it is written, whatever its runtime: what the
program computed from one (nonzero) theta and momentum buffer next to eager PyTorch from the same
state, as max abs differences, and the gate that refuses a program beyond tolerance."""

from __future__ import annotations

import torch

from zotune.adapters.theta import set_theta, theta_of
from zotune.engines.export_common import ExportCheckError
from zotune.estimators.prge import VELOCITY, flat_update
from zotune.loss import score_outputs
from zotune.rng import noise as rng_noise

# Metrics every program is held to exactly (1e-5), whatever its arithmetic: set/get of theta,
# and the update (and momentum buffer) the program's own g implies.
EXACT = {"set_get": 1e-5, "update": 1e-5, "momentum": 1e-5}
# An fp32 program matches eager everywhere.
FP32 = {**EXACT, "forward": 1e-5, "loss": 1e-5, "loss_diff": 1e-5, "theta": 1e-5}


def max_diff(a, b) -> float:
    """Max abs difference; equal values (both -inf: a choice score's spare row) differ by 0."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    if not a.numel():
        return 0.0
    return float(torch.where(a == b, 0.0, (a - b).abs()).max())


def _flat(outputs) -> torch.Tensor:
    """An evaluation method's outputs (a tensor or a tuple of them) as one vector."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return torch.cat([torch.as_tensor(t).detach().double().reshape(-1) for t in outputs])


def check_values(theta0: torch.Tensor, momentum: float, seed: int, dtype=None) -> tuple:
    """A nonzero theta [N] (and momentum buffer, with momentum > 0) for the parity check: at
    zero the LoRA-FA forward would not depend on theta at all."""
    dtype = dtype or theta0.dtype
    gen = torch.Generator().manual_seed(seed)
    theta = (torch.randn(theta0.shape, generator=gen) * 0.02).to(dtype)
    velocity = None
    if momentum:
        gen = torch.Generator().manual_seed(seed + 1)
        velocity = (torch.randn(theta0.shape, generator=gen) * 0.1).to(dtype)
    return theta, velocity


@torch.no_grad()
def parity_metrics(program: dict, plan, theta: torch.Tensor, velocity) -> dict:
    """Max abs differences between what a program computed from (theta, velocity) and eager
    PyTorch from the same state.

    program: {"get": theta read back after setting it, "logits": the outputs of the evaluation
    method on plan.eval_in (signature.py), "loss",
    "g": one train step on plan.batch, "theta" and (with momentum) "velocity": the state after
    it}. plan: the exporter's check inputs (step: the eager PRGEStep with fused noise, adapter,
    loss, model, seed_t, lr_t, eps_t, batch, eval_in). Moves the adapter's theta (and the model's
    VELOCITY buffer): the caller restores them."""
    step, adapter, loss, model = plan.step, plan.adapter, plan.loss, plan.model
    seed_t, lr_t, eps_t = plan.seed_t, plan.lr_t, plan.eps_t
    set_theta(adapter, theta)
    if velocity is not None:
        getattr(model, VELOCITY).copy_(velocity)
    logits_eager = _flat(score_outputs(loss, model, plan.eval_in))
    finite = logits_eager[torch.isfinite(logits_eager)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    loss_eager, g_eager = step(seed_t, lr_t, eps_t, *plan.batch)
    theta_eager = theta_of(adapter)

    # The update the program's own g implies, computed in eager from the same z (the RNG is
    # bit-exact): checks the noise, the update and the momentum buffer whatever g came out.
    g_p = torch.as_tensor(program["g"])
    z = rng_noise(seed_t, 0, step.q * theta.numel(), step.noise, theta.dtype)
    z = z.reshape(step.q, -1)  # [q, N]
    v_expected = None if velocity is None else velocity.clone()
    theta_expected = flat_update(theta, z, g_p, lr_t, step.momentum, v_expected)
    momentum = {}
    if velocity is not None:
        momentum["momentum"] = max_diff(program["velocity"], v_expected)
    return {
        "set_get": max_diff(program["get"], theta),
        # Logits and scores are compared relative to their scale (real LMs give logits of 10-30).
        "forward": max_diff(_flat(program["logits"]), logits_eager) / max(1.0, scale),
        "loss": max_diff(torch.as_tensor(program["loss"]).reshape(()), loss_eager),
        # g = (l+ - l-) / (2 eps): compare the loss differences it comes from.
        "loss_diff": max_diff(g_p * 2 * eps_t, g_eager * 2 * eps_t),
        "theta": max_diff(program["theta"], theta_eager),
        "update": max_diff(program["theta"], theta_expected),
        **momentum,
    }


def gate(check: dict, tol: dict, what: str, out_path) -> None:
    """Raise ExportCheckError naming every metric above its tolerance (NaN counts as above)."""
    bad = {k: v for k, v in check.items() if k in tol and not (v <= tol[k])}
    if bad:
        raise ExportCheckError(
            f"the {what} differs from eager PyTorch beyond tolerance: "
            + ", ".join(f"{k} {v:.3g} > {tol[k]:g}" for k, v in bad.items())
            + f"; nothing was written to {out_path}"
        )
