"""Evaluation on a tokenised split through any engine's `scores`.

Classification: label-word scoring at the answer position (accuracy), plus the zero-shot baseline
with a decision threshold chosen on dev (a model that calls most examples one class is not
necessarily uninformative). Generation: mean token loss and perplexity over the completions.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from zotune.loss import batch_tensors


def collect_scores(engine, batch, kind: str, eval_batch_size: int):
    """Engine scores for every row, in chunks (static-shape engines pad chunks themselves)."""
    # Dynamic-shape engines trim padding per chunk: group prompts of similar length together.
    order = batch.attention_mask.reshape(len(batch), -1).sum(1).argsort(stable=True)
    chunks = [order[s : s + eval_batch_size] for s in range(0, len(batch), eval_batch_size)]
    # A distributed engine scores its rank's share of the chunks and gathers the rest
    # (train/distributed.py): the same chunks, so the same scores as one process.
    score = getattr(engine, "score_chunks", None) or partial(score_chunks, engine)
    parts = score(batch, chunks, kind)
    inverse = order.argsort()
    return tuple(torch.cat(p)[inverse] for p in zip(*parts))


def score_chunks(engine, batch, chunks: list[torch.Tensor], kind: str) -> list[tuple[torch.Tensor, ...]]:
    """engine.scores of each chunk of rows (index tensors into batch)."""
    return [tuple(engine.scores(batch_tensors(batch.index(c), kind))) for c in chunks]


def evaluate(engine, batch, kind: str, eval_batch_size: int = 32) -> dict:
    if len(batch) == 0:
        return {}
    if kind in ("classification", "choice"):  # choice: logits are the choices' scores
        (logits,) = collect_scores(engine, batch, kind, eval_batch_size)  # [n, C]
        pred = logits.argmax(-1)
        logp = torch.log_softmax(logits.float(), -1)
        nll = -logp.gather(1, batch.labels.unsqueeze(1)).mean()
        return {
            "accuracy": float((pred == batch.labels).float().mean()),
            "loss": float(nll),
            "logits": logits,
        }
    nll, count = collect_scores(engine, batch, kind, eval_batch_size)
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
