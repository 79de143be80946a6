"""Task losses computed only where labels are: the answer position (classification) or the last
L positions that hold the completion (generation). Written with log_softmax + gather because
ExecuTorch has no nll_loss kernel.

Every function returns per-row sums and counts, so that callers can reduce per replica.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassificationInputs(NamedTuple):
    """What ClassificationLoss takes, in its argument order."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    choice_ids: torch.Tensor  # [B, C] token id of each candidate word
    labels: torch.Tensor  # [B] index of the right choice


class GenerationInputs(NamedTuple):
    """What LMLoss takes, in its argument order."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    target_ids: torch.Tensor  # [B, L] the completion: the last L positions
    target_mask: torch.Tensor  # [B, L]


class ChoiceInputs(NamedTuple):
    """What ChoiceLoss (loss_choice.py) takes, in its argument order: every choice is a row."""

    input_ids: torch.Tensor  # [B, C, T] prompt + choice c, left padded
    attention_mask: torch.Tensor  # [B, C, T]
    position_ids: torch.Tensor  # [B, C, T]
    target_ids: torch.Tensor  # [B, C, L] the choice's tokens: the last L positions
    target_mask: torch.Tensor  # [B, C, L] token weights (1, or 1/len when length-normalised)
    labels: torch.Tensor  # [B] index of the right choice


Inputs = ClassificationInputs | GenerationInputs | ChoiceInputs


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Softmax in fp32 even for half-precision models (fp64 models stay fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def decoder_hidden(model: nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Final hidden states [B, T, d] (after the last norm), without the LM head."""
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out[0]


def _softcap(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def choice_logits(
    model: nn.Module, h: torch.Tensor, choice_ids: torch.Tensor, via_head_module: bool = False
) -> torch.Tensor:
    """Logits of the candidate words. h: [B, d], choice_ids: [B, C] -> [B, C].

    By default only the C rows of the LM head are read (index_select), not the whole vocabulary.
    via_head_module calls the head itself, for modes that perturb weights inside module calls."""
    head = model.get_output_embeddings()
    if via_head_module:
        return _softcap(model, head(h)).gather(1, choice_ids)  # [B, V] -> [B, C]
    b, c = choice_ids.shape
    w = head.weight.index_select(0, choice_ids.reshape(-1)).reshape(b, c, -1)  # [B, C, d]
    logits = torch.bmm(w, h.unsqueeze(-1)).squeeze(-1)  # [B, C]
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias.index_select(0, choice_ids.reshape(-1)).reshape(b, c)
    return _softcap(model, logits)


class ClassificationLoss:
    """Cross-entropy over the candidate label words at the last position (MeZO's
    train-as-classification)."""

    kind = "classification"

    def __init__(self, via_head_module: bool = False):
        self.via_head_module = via_head_module

    def logits(self, model, input_ids, attention_mask, position_ids, choice_ids):
        h = decoder_hidden(model, input_ids, attention_mask, position_ids)[:, -1]  # [B, d]
        return choice_logits(model, h, choice_ids, self.via_head_module)  # [B, C]

    def rows(self, model, input_ids, attention_mask, position_ids, choice_ids, labels):
        """-> (nll per row [B], count per row [B])"""
        logp = F.log_softmax(
            _at_least_fp32(self.logits(model, input_ids, attention_mask, position_ids, choice_ids)), dim=-1
        )  # [B, C]
        nll = -logp.gather(1, labels.unsqueeze(1)).squeeze(1)  # [B]
        return nll, torch.ones_like(nll)


class LMLoss:
    """Mean token cross-entropy over the completion tokens (the last L positions)."""

    kind = "generation"

    def __init__(self, via_head_module: bool = True):
        self.via_head_module = via_head_module

    def rows(self, model, input_ids, attention_mask, position_ids, target_ids, target_mask):
        seq_len, n_target = input_ids.shape[1], target_ids.shape[1]
        h = decoder_hidden(model, input_ids, attention_mask, position_ids)
        # The token at position t is predicted from position t-1.
        h = h[:, seq_len - n_target - 1 : seq_len - 1]  # [B, L, d]
        logits = _at_least_fp32(_softcap(model, model.get_output_embeddings()(h)))  # [B, L, V]
        nll = -F.log_softmax(logits, dim=-1).gather(2, target_ids.unsqueeze(-1)).squeeze(-1)
        mask = target_mask.to(nll.dtype)  # [B, L]
        return (nll * mask).sum(1), mask.sum(1)


def make_loss(kind: str, via_head_module: bool = False):
    if kind == "classification":
        return ClassificationLoss(via_head_module)
    if kind in ("generation", "chat"):  # chat: target_mask covers the assistant turns
        return LMLoss()
    if kind == "choice":
        from zotune.loss_choice import ChoiceLoss

        return ChoiceLoss()
    raise ValueError(f"unknown task kind '{kind}'")


def score_outputs(loss, model, batch) -> tuple[torch.Tensor, ...]:
    """What evaluation reads from a batch (a loss's tensors; labels, if there, are not used):
    classification: (choice logits [B, C],); choice: (choice scores [B, C],); generation and
    chat: (nll sum [B], token count [B])."""
    if loss.kind == "classification":
        return (loss.logits(model, *batch[:4]),)
    if loss.kind == "choice":
        return (loss.scores(model, *batch[:5]),)
    return tuple(loss.rows(model, *batch[:5]))


def _inputs_class(kind: str) -> type:
    # chat is generation with the target mask on the assistant turns
    return {"classification": ClassificationInputs, "choice": ChoiceInputs}.get(kind, GenerationInputs)


def batch_tensors(batch, kind: str) -> Inputs:
    """The tensors a loss takes, in order, from a tokenised Batch."""
    common = (batch.input_ids, batch.attention_mask, batch.position_ids)
    if kind == "classification":
        return ClassificationInputs(*common, batch.choice_ids, batch.labels)
    if kind == "choice":
        return ChoiceInputs(*common, batch.target_ids, batch.target_mask, batch.labels)
    return GenerationInputs(*common, batch.target_ids, batch.target_mask)


def loss_inputs(tensors, kind: str) -> Inputs:
    """A plain tuple of a loss's tensors as the named tuple of its kind."""
    cls = _inputs_class(kind)
    return tensors if isinstance(tensors, cls) else cls(*tensors)


def trim_left_padding(batch: tuple[torch.Tensor, ...], keep: int = 1) -> tuple[torch.Tensor, ...]:
    """Drop the leading columns that are padding in every row (left padding), keeping at least
    `keep` positions. Exact for attention-masked models; engines with dynamic shapes use it so a
    batch of short prompts does not pay for the static length."""
    input_ids, attention_mask, position_ids, *rest = batch
    seq_len = input_ids.shape[-1]  # [B, T], or [B, C, T] for multiple choice
    used = attention_mask.reshape(-1, seq_len).any(0).nonzero()
    start = int(used[0]) if len(used) else 0
    start = min(start, seq_len - keep)
    if start <= 0:
        return batch
    trimmed = (input_ids[..., start:], attention_mask[..., start:], position_ids[..., start:], *rest)
    return batch._make(trimmed) if hasattr(batch, "_make") else trimmed  # named tuples stay named


def replica_sums(nll: torch.Tensor, count: torch.Tensor, n_rep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss sum and token count of each replica: rows are laid out replica-major. -> [R], [R]"""
    return nll.reshape(n_rep, -1).sum(1), count.reshape(n_rep, -1).sum(1)


def mean_loss(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Token-level mean loss from sums and counts (kept apart so ranks can add them first)."""
    return sums / counts.clamp_min(1)


def per_replica(nll: torch.Tensor, count: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Token-level mean loss of each replica: rows are laid out replica-major. -> [R]"""
    return mean_loss(*replica_sums(nll, count, n_rep))
