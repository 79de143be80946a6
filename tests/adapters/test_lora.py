import pytest
import torch

from helpers import randomize, synthetic_batch
from zotune.adapters.lora import LoRAAdapter, find_targets
from zotune.errors import ConfigError
from zotune.loss import ClassificationLoss

EXPECTED_LEAVES = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
}


def test_all_linear_targets_every_block_projection(family, tiny_model):
    names = find_targets(tiny_model, ["all-linear"])
    assert {n.rsplit(".", 1)[-1] for n in names} == EXPECTED_LEAVES[family]
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_named_targets_and_no_match(tiny_model, family):
    if family == "gpt2":
        assert len(find_targets(tiny_model, ["c_attn"])) == 2
    else:
        assert len(find_targets(tiny_model, ["q_proj", "v_proj"])) == 4
    with pytest.raises(ConfigError, match="matched no linear layer"):
        find_targets(tiny_model, ["nothing_like_this"])


def test_zero_b_leaves_the_model_unchanged(tiny_model):
    batch = synthetic_batch()
    loss = ClassificationLoss()
    before = loss.logits(tiny_model, *batch[:4])
    adapter = LoRAAdapter(tiny_model, rank=4, alpha=8)
    assert torch.equal(before, loss.logits(tiny_model, *batch[:4]))
    assert adapter.numel == sum(layer.lora_B.numel() for layer in adapter.layers.values())
    assert all(
        not p.requires_grad
        for p in tiny_model.parameters()
        if p.dim() and p is not None and all(p is not layer.lora_B for layer in adapter.layers.values())
    )


def test_replica_mode_equals_one_forward_per_replica(tiny_model):
    adapter = LoRAAdapter(tiny_model, rank=4, alpha=8, train_a=True)
    batch = synthetic_batch(b=3)
    loss = ClassificationLoss()
    stacks, singles = {}, []
    for r in range(3):  # three replicas with different A and B
        randomize(adapter.tensors(), seed=r)
        singles.append(loss.logits(tiny_model, *batch[:4]))
        stacks[r] = {
            n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
            for n, layer in adapter.layers.items()
        }
    adapter.set_replicas(
        {
            n: (
                torch.stack([stacks[r][n][0] for r in range(3)]),
                torch.stack([stacks[r][n][1] for r in range(3)]),
            )
            for n in adapter.layers
        }
    )
    tiled = [t.repeat(3, *([1] * (t.dim() - 1))) for t in batch[:4]]
    together = loss.logits(tiny_model, *tiled).reshape(3, 3, -1)
    adapter.set_replicas(None)
    for r in range(3):
        torch.testing.assert_close(together[r], singles[r], rtol=1e-5, atol=1e-5)


def test_merged_weight_matches_forward(tiny_model):
    adapter = LoRAAdapter(tiny_model, rank=4, alpha=8)
    randomize(adapter.tensors())
    name, layer = next(iter(adapter.layers.items()))
    x = torch.randn(2, 5, layer.d_in)
    expected = x @ layer.merged_weight().t()
    bias = getattr(layer.base, "bias", None)
    if bias is not None:
        expected = expected + bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
