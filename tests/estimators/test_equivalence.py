"""The central correctness test: P-RGE (outer + inner loop in one pass, or outer only) computes
the same projected gradients and update as sequential RGE for the same seed."""

import pytest
import torch

from helpers import randomize, synthetic_batch
from zotune.adapters.lora import LoRAAdapter
from zotune.estimators.prge import VELOCITY, PRGEStep
from zotune.estimators.rge import RGE
from zotune.estimators.zo import draw
from zotune.loss import ClassificationLoss, per_replica
from zotune.models.tiny import make_tiny_model

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def rel(a, b):
    return ((a - b).abs() / b.abs().clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["lora-fa", "lora"])
def test_prge_equals_sequential_rge(family, tokenizer, dtype, kind):
    model = make_tiny_model(family, tokenizer, dtype=dtype)
    adapter = LoRAAdapter(model, rank=4, alpha=8, train_a=(kind == "lora"))
    randomize(adapter.tensors())  # B = 0 would make every replica's A-path identical
    start = adapter.state()
    batch, loss, seed = synthetic_batch(), ClassificationLoss(), 1234
    results = {}
    for name in ("dual", "single", "rge"):
        adapter.load_state(start)
        if name == "rge":
            _, g = RGE(model, adapter, loss, q=4).step(batch, seed, 1e-2, 1e-2)
        else:
            step = PRGEStep(model, adapter, loss, q=4, dual=(name == "dual"))
            _, g = step(torch.tensor([seed]), 1e-2, 1e-2, *batch)
        results[name] = (g, adapter.state())
    g_ref, state_ref = results["rge"]
    assert g_ref.abs().min() > 0
    for name in ("dual", "single"):
        g, state = results[name]
        assert rel(g, g_ref) <= TOL[dtype], name
        for key in state_ref:
            torch.testing.assert_close(state[key], state_ref[key], rtol=TOL[dtype], atol=1e-7)
    assert not torch.equal(
        state_ref[next(k for k in state_ref if k.endswith("lora_B"))],
        start[next(k for k in start if k.endswith("lora_B"))],
    )


def test_g_is_the_directional_derivative(tokenizer):
    """In float64 with a small eps, g_i approaches z_i . grad L (autograd)."""
    model = make_tiny_model("llama", tokenizer, dtype=torch.float64)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    randomize(adapter.tensors())
    batch, loss = synthetic_batch(), ClassificationLoss()
    step = PRGEStep(model, adapter, loss, q=3)
    seed = torch.tensor([99])
    zs = draw(seed, adapter.layout, adapter.tensors()[0], 3, "normal")
    for t in adapter.tensors():
        t.requires_grad_(True)
    value = per_replica(*loss.rows(model, *batch), 1)[0]
    grads = torch.autograd.grad(value, adapter.tensors())
    exact = torch.stack([sum((z[i] * gr).sum() for z, gr in zip(zs, grads)) for i in range(3)])
    for t in adapter.tensors():
        t.requires_grad_(False)
    _, g = step(seed, 0.0, 1e-3, *batch)  # RoPE tables are fp32 even in fp64 models
    torch.testing.assert_close(g, exact, rtol=1e-3, atol=1e-6)


def test_update_is_minus_lr_times_mean_g_z(tokenizer):
    model = make_tiny_model("qwen2", tokenizer, dtype=torch.float64)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    before = [t.clone() for t in adapter.tensors()]
    seed, lr = torch.tensor([5]), 0.5
    _, g = PRGEStep(model, adapter, ClassificationLoss(), q=4)(seed, lr, 1e-3, *synthetic_batch())
    zs = draw(seed, adapter.layout, adapter.tensors()[0], 4, "normal")
    for b0, t, z in zip(before, adapter.tensors(), zs):
        expected = b0 - lr * (g.double()[:, None, None] * z).mean(0)
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-9)


def test_momentum_accumulates(tokenizer):
    model = make_tiny_model("llama", tokenizer)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    step = PRGEStep(model, adapter, ClassificationLoss(), q=2, momentum=0.9)
    step(torch.tensor([1]), 1e-2, 1e-2, *synthetic_batch())
    m1 = [b.clone() for b in step.velocity]
    step(torch.tensor([2]), 1e-2, 1e-2, *synthetic_batch())
    assert all(b.abs().sum() > 0 for b in m1)
    assert not all(torch.equal(a, b) for a, b in zip(m1, step.velocity))


def test_fused_noise_draws_the_same_z(tokenizer):
    adapter = LoRAAdapter(make_tiny_model("gpt2", tokenizer), rank=4, alpha=8)
    seed = torch.tensor([77])
    per_tensor = draw(seed, adapter.layout, adapter.tensors()[0], 3, "rademacher")
    fused = draw(seed, adapter.layout, adapter.tensors()[0], 3, "rademacher", fused=True)
    one = draw(seed, adapter.layout, adapter.tensors()[0], 3, "rademacher", query=2)
    for a, b, c in zip(per_tensor, fused, one):
        assert torch.equal(a, b) and torch.equal(a[2:3], c)


@pytest.mark.parametrize(
    "train_a,dual,momentum", [(False, True, 0.0), (True, True, 0.0), (False, False, 0.0), (True, True, 0.9)]
)
def test_flat_step_equals_per_layer_step_bitwise(tokenizer, train_a, dual, momentum):
    """The fused (exported) form of PRGEStep gives the same bits as the per-layer eager form,
    momentum buffer included."""
    results = []
    for fused in (False, True):
        model = make_tiny_model("qwen2", tokenizer)
        adapter = LoRAAdapter(model, rank=4, alpha=8, train_a=train_a)
        randomize(adapter.tensors())
        step = PRGEStep(
            model, adapter, ClassificationLoss(), q=3, dual=dual, momentum=momentum, fused_noise=fused
        )
        out = [step(torch.tensor([s]), 1e-2, 1e-2, *synthetic_batch()) for s in (5, 6, 7)]
        velocity = (
            torch.cat([v.reshape(-1) for v in step.velocity])
            if step.velocity
            else getattr(model, VELOCITY, None)
        )
        if fused and momentum:  # per-tensor views of the flat buffer, which checkpoints read
            flat = getattr(model, VELOCITY)
            assert step.velocity[0].data_ptr() == flat.data_ptr() and torch.equal(velocity, flat)
        results.append((out, [t.clone() for t in adapter.tensors()], velocity))
    (out_a, theta_a, v_a), (out_b, theta_b, v_b) = results
    for (la, ga), (lb, gb) in zip(out_a, out_b):
        assert torch.equal(la, lb) and torch.equal(ga, gb)
    assert all(torch.equal(a, b) for a, b in zip(theta_a, theta_b))
    if momentum:
        assert v_a.abs().sum() > 0 and torch.equal(v_a, v_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perturbed_stack_is_bitwise_the_plain_expression(dtype):
    from zotune.estimators.prge import perturbed

    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 4, generator=g, dtype=dtype)
    z = torch.randn(3, 6, 4, generator=g, dtype=dtype)
    buf = torch.full((200,), float("nan"), dtype=dtype)  # larger than needed, reused by layers
    out = perturbed(p, z, 1e-2, (1, -1), buf)
    expect = torch.cat([p + (s * 1e-2) * z for s in (1, -1)])  # [6, 6, 4]
    assert out.shape == expect.shape and torch.equal(out, expect)
    assert out.data_ptr() == buf.data_ptr()  # written in place, no new allocation


def test_replica_stacks_are_built_when_each_layer_runs(family, tokenizer):
    """The step holds one layer's stacks at a time: every layer's builder writes into the same
    buffers, and the forward calls each builder inside its layer."""
    from zotune.estimators.prge import replica_stacks

    model = make_tiny_model(family, tokenizer)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    z = {e.name: torch.ones(2, *e.shape) for e in adapter.layout}
    stacks = replica_stacks(adapter, z.__getitem__, 2, 1e-2, (1, -1))
    assert all(callable(f) for f in stacks.values())
    with torch.no_grad():  # as every estimator calls it
        built = [f()[1].data_ptr() for f in stacks.values()]
    assert len(set(built)) == 1
    calls = []
    for name, f in list(stacks.items()):
        stacks[name] = lambda f=f, name=name: calls.append(name) or f()
    loss = ClassificationLoss()
    batch = synthetic_batch()
    from zotune.estimators.prge import stacked_losses

    with torch.no_grad():
        losses = stacked_losses(model, adapter, loss, stacks, 4, batch)
    assert calls == list(adapter.layers) and losses.shape == (4,)
