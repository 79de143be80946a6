"""Multiple choice with multi-token answers: every choice of every example is a row of one batch.

An example with prompt p and choices c_1..c_n becomes C rows p + c_k (C = the most choices any example
of the split has), each laid out like a generation row: left padding, the choice right-aligned in the
last L = data.max_target_length positions, target_mask over its tokens. The batch keeps an example
axis, so that selecting examples, tiling replicas and slicing chunks work as for every other kind:

    input_ids, attention_mask, position_ids  [b, C, T]
    target_ids, target_mask                  [b, C, L]   (target_ids = input_ids[..., -L:])
    labels                                   [b]

A choice's score is sum_k target_mask_k * log p(token_k | prefix) (loss_choice.py). The mask holds 1
per token, or 1/len with data.length_normalize (the mean log-probability), so the loss needs no
option of its own. Examples with fewer than C choices fill the spare rows with a copy of their first
choice and an all-zero mask: the row computes ordinary numbers (an all-padding row would make
attention produce NaN) and its score is -inf.

One-token classification is the special case where every choice is one token: the cross-entropy over
the choices' summed log-probabilities equals the cross-entropy over their logits at the answer
position (log p = logit - logsumexp, the same constant for every choice). `resolve_kind` therefore
scores a multiple-choice task as classification when it can and as choice otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zotune.errors import DataError


def _ids(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    unique = list(dict.fromkeys(texts))
    return dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"])) if unique else {}


def resolve_kind(kind: str, examples: Sequence, tokenizer) -> str:
    """'classification' when every example has the same number of choices and every choice is one
    token; 'choice' for a multiple-choice task that is not; other kinds unchanged."""
    if kind != "classification":
        return kind
    counts = {len(ex.choices) for ex in examples}
    lengths = {len(v) for v in _ids(tokenizer, [c for ex in examples for c in ex.choices]).values()}
    return "classification" if len(counts) <= 1 and lengths <= {1} else "choice"


def check_choices(choices, answer, where: dict) -> None:
    """A JSON record's choices (a list of >= 2 non-empty strings) and answer (an index into it)."""
    if not isinstance(choices, list) or len(choices) < 2:
        n = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise DataError(f"expected a list of at least 2 choices, got {n}", field="choices", **where)
    for k, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise DataError(f"expected a non-empty string, got {c!r:.60}", field=f"choices[{k}]", **where)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise DataError(
            f"expected an index 0..{len(choices) - 1} into choices, got {answer!r:.60}",
            field="answer",
            **where,
        )


def encode_choice(examples: Sequence, tokenizer, T: int, L: int, length_normalize: bool = False):
    from zotune.data.tokenize import Batch, _assemble, _context, _pad_id, check_target_length, special_prefix

    check_target_length(T, L, "a choice")
    for i, ex in enumerate(examples):
        if len(ex.choices) < 2:
            raise DataError(
                f"example {i} has {len(ex.choices)} choices; multiple choice needs at least 2",
                field="choices",
                **ex.where(),
            )
        if ex.label is None or not 0 <= ex.label < len(ex.choices):
            raise DataError(
                f"example {i}: answer {ex.label!r} is not an index into its {len(ex.choices)} choices",
                field="answer",
                **ex.where(),
            )
    C = max(len(ex.choices) for ex in examples)
    prefix = special_prefix(tokenizer)
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    tokens = _ids(tokenizer, [c for ex in examples for c in ex.choices])
    rows, weights = [], []  # b*C rows; per row the weight of each of its last L positions
    for i, (ex, prompt) in enumerate(zip(examples, prompts)):
        for k in range(C):
            real = k < len(ex.choices)
            text = ex.choices[k if real else 0]
            ids = tokens[text]
            if not ids:
                raise DataError(
                    f"example {i}: choice {k} {text!r} has no tokens", field=f"choices[{k}]", **ex.where()
                )
            if len(ids) > L:
                raise DataError(
                    f"example {i}: choice {k} {text[:40]!r} is {len(ids)} tokens, more than "
                    f"data.max_target_length={L}",
                    field=f"choices[{k}]",
                    **ex.where(),
                )
            context = _context(prefix, prompt, T - len(ids))
            if not context:
                raise DataError(
                    f"example {i}: empty prompt (nothing to predict the choice from)",
                    field="prompt",
                    **ex.where(),
                )
            rows.append(context + ids)
            w = (1.0 / len(ids) if length_normalize else 1.0) if real else 0.0
            weights.append([0.0] * (L - len(ids)) + [w] * len(ids))
    input_ids, attention_mask, position_ids = _assemble(rows, T, _pad_id(tokenizer))  # [b*C, T]
    b = len(examples)
    input_ids, attention_mask, position_ids = (
        x.reshape(b, C, T) for x in (input_ids, attention_mask, position_ids)
    )
    target_mask = torch.tensor(weights, dtype=torch.float32).reshape(b, C, L)  # [b, C, L]
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)  # [b]
    return Batch(
        input_ids,
        attention_mask,
        position_ids,
        labels=labels,
        target_ids=input_ids[..., T - L :].clone(),
        target_mask=target_mask,
    )


def pad_choices(tensors: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
    """A choice batch's tensors (input_ids, attention_mask, position_ids, target_ids,
    target_mask[, labels]) with the choice axis filled up to n the way encode_choice fills an
    example's spare rows: copies of the first choice with an all-zero target mask (score -inf,
    so the cross-entropy over the choices is unchanged). Static-shape programs take one C; the
    splits of a task may each have a different most-choices count."""
    ids, am, pos, target_ids, target_mask, *rest = tensors
    have = ids.shape[1]
    if have >= n:
        return list(tensors)

    def fill(t: torch.Tensor, zero: bool = False) -> torch.Tensor:
        extra = t[:, :1].expand(t.shape[0], n - have, *t.shape[2:])
        return torch.cat([t, torch.zeros_like(extra) if zero else extra], 1)

    return [fill(ids), fill(am), fill(pos), fill(target_ids), fill(target_mask, zero=True), *rest]
