"""Checks on the real parts: the embedded SmolLM2-135M and the real BIG-bench multiemo data."""

import pytest
import torch

from zotune.adapters.lora import LoRAAdapter
from zotune.config import DataConfig
from zotune.data import load_task
from zotune.data.tokenize import encode
from zotune.estimators.prge import PRGEStep
from zotune.estimators.rge import RGE
from zotune.loss import ClassificationLoss, batch_tensors
from zotune.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    model, tokenizer, _ = load_model("smollm2-135m")
    cfg = DataConfig(
        task="bigbench:multiemo", labels=["positive", "negative"], max_input_chars=200, max_length=64
    )
    task = load_task(cfg)
    return model, tokenizer, task


def test_multiemo_splits_and_zero_shot(real):
    model, tokenizer, task = real
    assert task.sizes() == {"train": 1000, "dev": 200, "test": 500}
    batch = encode(task.dev[:48], tokenizer, 64, 16, task.kind)
    with torch.no_grad():
        logits = ClassificationLoss().logits(model, *batch_tensors(batch, task.kind)[:4])
    acc = float((logits.argmax(-1) == batch.labels).float().mean())
    # Zero-shot is about 0.60 on this task, most examples called positive (benchmarks/README.md).
    assert 0.45 <= acc <= 0.8


def test_prge_equals_rge_on_the_real_model(real):
    model, tokenizer, task = real
    adapter = LoRAAdapter(model, rank=16, alpha=32)
    try:
        batch = batch_tensors(encode(task.train[:2], tokenizer, 64, 16, task.kind), task.kind)
        loss = ClassificationLoss()
        start = adapter.state()
        _, g_p = PRGEStep(model, adapter, loss, q=2)(torch.tensor([3]), 3e-3, 1e-2, *batch)
        after = adapter.state()
        adapter.load_state(start)
        _, g_r = RGE(model, adapter, loss, q=2).step(batch, 3, 3e-3, 1e-2)
        assert len(adapter.layers) == 210
        assert ((g_p - g_r).abs() / g_r.abs().clamp_min(1e-6)).max() <= 1e-4
        key = next(k for k in after if k.endswith("lora_B"))
        assert after[key].abs().sum() > 0
    finally:  # unwrap so the module-scoped model stays plain for other tests
        for name, layer in adapter.layers.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base)
