"""Evaluation on a tokenised split through any engine's `scores`.

Classification: label-word scoring at the answer position (accuracy), plus the zero-shot baseline
with a decision threshold chosen on dev (a model that calls most examples one class is not
necessarily uninformative). Generation: mean token loss and perplexity over the completions.
"""

from __future__ import annotations

import math

import torch

from zotune.loss import batch_tensors


def _chunks(batch, size: int, fixed: bool):
    """Slices of at most `size` rows; with fixed=True the last one is padded by repeating rows
    (static-shape engines), and the number of real rows is returned beside each slice."""
    n = len(batch)
    for start in range(0, n, size):
        idx = torch.arange(start, min(start + size, n))
        real = len(idx)
        if fixed and real < size:
            idx = torch.cat([idx, idx[-1].repeat(size - real)])
        yield batch.index(idx), real


def collect_scores(engine, batch, kind: str, eval_batch_size: int, fixed: bool = False):
    # Dynamic-shape engines trim padding per chunk: group prompts of similar length together.
    order = torch.arange(len(batch)) if fixed else batch.attention_mask.sum(1).argsort(stable=True)
    parts: list[tuple[torch.Tensor, ...]] = []
    for chunk, real in _chunks(batch.index(order), eval_batch_size, fixed):
        out = engine.scores(batch_tensors(chunk, kind))
        parts.append(tuple(o[:real] for o in out))
    inverse = order.argsort()
    return tuple(torch.cat(p)[inverse] for p in zip(*parts))


def evaluate(engine, batch, kind: str, eval_batch_size: int = 32, fixed: bool = False) -> dict:
    if len(batch) == 0:
        return {}
    if kind == "classification":
        (logits,) = collect_scores(engine, batch, kind, eval_batch_size, fixed)  # [n, C]
        pred = logits.argmax(-1)
        logp = torch.log_softmax(logits.float(), -1)
        nll = -logp.gather(1, batch.labels.unsqueeze(1)).mean()
        return {"accuracy": float((pred == batch.labels).float().mean()), "loss": float(nll),
                "logits": logits}
    nll, count = collect_scores(engine, batch, kind, eval_batch_size, fixed)
    loss = float(nll.sum() / count.sum().clamp_min(1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def calibrated_accuracy(dev_logits, dev_labels, test_logits, test_labels) -> tuple[float, float]:
    """Two-class baseline: predict class 0 when logit0 - logit1 > t, with t chosen on dev.
    -> (threshold, test accuracy)."""
    dev_margin = (dev_logits[:, 0] - dev_logits[:, 1]).float()
    best_t, best_acc = 0.0, -1.0
    cands = torch.cat([dev_margin.sort().values, dev_margin.max().reshape(1) + 1])
    for t in cands.tolist():
        acc = float(((dev_margin >= t).long() == (dev_labels == 0).long()).float().mean())
        if acc > best_acc:
            best_t, best_acc = t, acc
    test_margin = (test_logits[:, 0] - test_logits[:, 1]).float()
    acc = float(((test_margin >= best_t).long() == (test_labels == 0).long()).float().mean())
    return best_t, acc
