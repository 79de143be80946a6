import torch

from helpers import synthetic_batch
from zotune.adapters.full import FullParams
from zotune.estimators.rge import RGE
from zotune.estimators.zo import update_from_seed
from zotune.loss import ClassificationLoss
from zotune.models.tiny import make_tiny_model


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_perturbations_restore_every_weight_exactly(family, tokenizer):
    model = make_tiny_model(family, tokenizer)
    params = FullParams(model)
    before = snapshot(model)
    loss = ClassificationLoss(via_head_module=True)
    rge = RGE(model, params, loss, q=3)
    _, g = rge.step(synthetic_batch(), seed=42, lr=0.0, eps=1e-3)
    assert g.abs().max() > 0  # the perturbations did change the loss
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # bitwise: no drift


def test_perturbation_is_visible_inside_the_forward(tokenizer):
    model = make_tiny_model("llama", tokenizer)
    params = FullParams(model)
    loss = ClassificationLoss(via_head_module=True)
    batch = synthetic_batch()
    base = loss.logits(model, *batch[:4])
    with params.perturbed(torch.tensor([1]), 0, 1e-2, "normal"):
        moved = loss.logits(model, *batch[:4])
    assert not torch.allclose(base, moved)
    assert torch.equal(base, loss.logits(model, *batch[:4]))


def test_full_update_matches_seed_replay(tokenizer):
    model = make_tiny_model("qwen2", tokenizer)
    params = FullParams(model)
    start = snapshot(model)
    rge = RGE(model, params, ClassificationLoss(via_head_module=True), q=2)
    _, g = rge.step(synthetic_batch(), seed=7, lr=1e-3, eps=1e-3)
    trained = snapshot(model)
    assert any(not torch.equal(start[n], trained[n]) for n in start)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    update_from_seed(params.layout, params.tensors(), torch.tensor([7]), g, 1e-3, "normal")
    assert all(torch.equal(trained[n], p) for n, p in model.named_parameters())
