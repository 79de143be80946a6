"""The Python API: config helpers, and zotune.PRGE on zotune, PEFT and half-precision models,
checked against zotune's own step and against the definition of g."""

import pytest
import torch
import torch.nn.functional as F

import zotune
from helpers import randomize
from zotune.adapters.lora import LoRAAdapter
from zotune.estimators.prge import PRGEStep
from zotune.estimators.zo import draw
from zotune.loss import ClassificationLoss
from zotune.models.tiny import make_tiny_model
from zotune.rng import step_seed


def batch_of(tokenizer, n=4):
    texts = [f"fact number {i} is that {i} plus one is {i + 1}" for i in range(n)]
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    mask = enc["attention_mask"]
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": mask,
        "position_ids": (mask.cumsum(1) - 1).clamp_min(0),
    }


def lm_rows(model, batch):
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    ).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp64 models stay fp64
    nll = F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    m = batch["attention_mask"][:, 1:].to(nll.dtype)
    return (nll * m).sum(1) / m.sum(1)


def test_load_config_overrides():
    cfg = zotune.load_config(
        {"optim": {"q": 8}}, optim__lr=1e-3, train={"steps": 5}, **{"data.max_length": 32}
    )
    assert (cfg.optim.q, cfg.optim.lr, cfg.train.steps, cfg.data.max_length) == (8, 1e-3, 5, 32)
    again = zotune.load_config(cfg, optim__q=2)
    assert again.optim.q == 2 and cfg.optim.q == 8  # a copy
    with pytest.raises(zotune.ZotuneError, match="unknown key 'optim.lrr'"):
        zotune.load_config(None, optim__lrr=1)
    with pytest.raises(zotune.ZotuneError, match="optim.q: expected an integer"):
        zotune.load_config(None, optim__q="many")


def test_train_and_evaluate_from_python(tmp_path, tiny_folder, cls_jsonl):
    cfg = {
        "model": {"name": tiny_folder},
        "data": {
            "task": f"jsonl:{cls_jsonl}",
            "train_size": 20,
            "dev_size": 8,
            "test_size": 8,
            "max_length": 16,
        },
        "adapter": {"rank": 2},
        "optim": {"q": 2, "batch_size": 2},
        "train": {"steps": 2, "eval_every": 2, "progress": False},
    }
    summary = zotune.train(cfg, train__out_dir=str(tmp_path / "run"))
    assert summary["steps"] == 2 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    metrics = zotune.evaluate(cfg, adapter=tmp_path / "run" / "adapter", split="test")
    assert metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"])


def test_step_is_zotunes_step(tokenizer):
    """On zotune's own adapter, est.step gives the bits of PRGEStep for the same seed."""
    from helpers import synthetic_batch

    batch = synthetic_batch()
    results = []
    for use_api in (True, False):
        model = make_tiny_model("llama", tokenizer)
        adapter = LoRAAdapter(model, rank=4, alpha=8)
        randomize(adapter.tensors())
        seed = step_seed(7, 0)
        if use_api:

            def loss_fn(m, b):
                return ClassificationLoss().rows(m, *b)[0]

            est = zotune.PRGE(model, loss_fn, q=3, lr=1e-2, seed=7, adapter=adapter)
            _, g = est.step(batch)
            assert est.history[0]["seed"] == seed
        else:
            step = PRGEStep(model, adapter, ClassificationLoss(), q=3)
            _, g = step(torch.tensor([seed]), 1e-2, 1e-2, *batch)
        results.append((g, adapter.state()))
    (g1, s1), (g2, s2) = results
    assert torch.equal(g1, g2) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_accumulated_micro_batches_equal_the_whole_batch(tokenizer):
    batch = batch_of(tokenizer, 4)
    out = []
    for micro in (False, True):
        model = make_tiny_model("qwen2", tokenizer, dtype=torch.float64)
        est = zotune.PRGE(model, lm_rows, q=2, lr=1e-1, rank=4, alpha=8)
        randomize(est.params.tensors())
        if micro:
            est.accumulate({k: v[:1] for k, v in batch.items()})
            est.accumulate({k: v[1:] for k, v in batch.items()})
            loss, g = est.apply()
        else:
            loss, g = est.step(batch)
        out.append((loss, g, est.state()))
    (l1, g1, s1), (l2, g2, s2) = out
    assert g1.abs().min() > 0
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)
    assert l1 == pytest.approx(l2, rel=1e-10)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-10, atol=1e-12)


def test_peft_model_g_is_the_two_sided_difference(tokenizer):
    """g from the one replica pass over PEFT's layers equals (L(B + eps z) - L(B - eps z)) / 2 eps
    computed by writing B +- eps z into PEFT's own weights and running PEFT's forward."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_tiny_model("llama", tokenizer, dtype=torch.float64),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    batch = batch_of(tokenizer, 3)
    est = zotune.PRGE(model, lm_rows, q=2, eps=1e-3, lr=0.0, seed=3)
    randomize(est.params.tensors())
    assert len(est.params.layout) == 6 and all(".lora_B" in n for n in est.params.layout.names)
    start = est.state()
    _, g = est.step(batch)
    zs = draw(torch.tensor([est.history[0]["seed"]]), est.params.layout, est.params.tensors()[0], 2, "normal")
    want = []
    with torch.no_grad():
        for i in range(2):
            ls = []
            for sign in (1, -1):
                for (name, t), z in zip(est.params.named_tensors(), zs):
                    t.copy_(start[name] + sign * 1e-3 * z[i])
                ls.append(lm_rows(model, batch).mean())
            want.append((ls[0] - ls[1]) / 2e-3)
    torch.testing.assert_close(g, torch.stack(want), rtol=1e-6, atol=1e-9)


def test_half_precision_model_trains_an_fp32_master(tokenizer):
    model = make_tiny_model("llama", tokenizer, dtype=torch.bfloat16)
    est = zotune.PRGE(model, lm_rows, q=2, lr=1e-3, rank=4, alpha=8)
    assert est.params.master and all(t.dtype == torch.float32 for t in est.params.tensors())
    batch = batch_of(tokenizer, 2)
    before = est.state()
    _, g = est.step(batch)
    zs = draw(torch.tensor([est.history[0]["seed"]]), est.params.layout, est.params.tensors()[0], 2, "normal")
    for (name, t), z in zip(est.params.named_tensors(), zs):
        want = before[name] - 1e-3 * (g[0] * z[0] + g[1] * z[1]) / 2
        torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-9)
        layer = est.adapter.layers[name.rsplit(".", 1)[0]]
        assert layer.lora_B.dtype == torch.bfloat16 and torch.equal(layer.lora_B, t.to(torch.bfloat16))


def test_bad_loss_shape_is_a_clear_error(tokenizer):
    model = make_tiny_model("llama", tokenizer)
    est = zotune.PRGE(model, lambda m, b: lm_rows(m, b).mean(), q=2, rank=2)
    with pytest.raises(zotune.ZotuneError, match=r"one loss per example, shape \[8\]"):
        est.step(batch_of(tokenizer, 2))
