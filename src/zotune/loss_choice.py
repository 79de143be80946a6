"""The multiple-choice loss: each choice scored by the summed log-probability of its tokens after
the prompt (weights in target_mask: 1 per token, or 1/len for the length-normalised mean), and the
cross-entropy over the C choices' scores. Layout of the batch: data/choice.py.

All b*C rows go through one forward pass. Under P-RGE the batch arrives tiled per replica,
[R*b, C, T]; flattened it is [R*b*C, T] replica-major, which is the row layout the adapter's replica
mode expects, and the per-example result [R*b] reduces per replica like any other loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zotune.loss import _at_least_fp32, _softcap, decoder_hidden


class ChoiceLoss:
    kind = "choice"

    def __init__(self, via_head_module: bool = True):
        self.via_head_module = via_head_module  # the whole vocabulary is needed for log p anyway

    def scores(self, model, input_ids, attention_mask, position_ids, target_ids, target_mask):
        """Score of every choice [b, C]; -inf for the spare rows of examples with fewer choices."""
        b, c, seq_len = input_ids.shape
        n_target = target_ids.shape[-1]

        def rows(x):
            return x.reshape(b * c, x.shape[-1])

        h = decoder_hidden(model, rows(input_ids), rows(attention_mask), rows(position_ids))
        h = h[:, seq_len - n_target - 1 : seq_len - 1]  # [b*C, L, d]: position t predicts token t+1
        logits = _at_least_fp32(_softcap(model, model.get_output_embeddings()(h)))  # [b*C, L, V]
        logp = F.log_softmax(logits, dim=-1).gather(2, rows(target_ids).unsqueeze(-1)).squeeze(-1)
        mask = rows(target_mask).to(logp.dtype)  # [b*C, L]
        score = (logp * mask).sum(1).reshape(b, c)  # [b, C]
        return score.masked_fill(target_mask.sum(-1) <= 0, float("-inf"))

    def rows(self, model, input_ids, attention_mask, position_ids, target_ids, target_mask, labels):
        """-> (cross-entropy over the choices per example [b], count per example [b])"""
        score = self.scores(model, input_ids, attention_mask, position_ids, target_ids, target_mask)
        nll = -F.log_softmax(score, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1)  # [b]
        return nll, torch.ones_like(nll)
