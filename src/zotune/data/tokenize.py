"""Examples -> fixed-shape tensors (static shapes, left padding).

Every batch has exactly max_length columns, so an exported program sees one input shape. With left
padding the answer is always at the end:
- classification: the label word is predicted from the last position T-1;
- generation: the completion fills the last positions. target_ids = input_ids[:, -L:], and the token at
  column j of target_ids is predicted by the logits at sequence position T-L-1+j, i.e. by
  logits[:, -L-1:-1]. target_mask says which of those L tokens are real completion tokens.

position_ids are explicit (cumsum of the mask - 1) so that a row gives the same result whatever padding
precedes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from zotune.data.task import KINDS, Example
from zotune.errors import DataError


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 0 on left padding
    position_ids: torch.Tensor  # [B, T] long, cumsum(mask)-1 clamped at 0
    choice_ids: torch.Tensor | None = None  # [B, C] long, classification: token id of each candidate word
    labels: torch.Tensor | None = None  # [B] long, classification: index of the right choice
    target_ids: torch.Tensor | None = None  # [B, L] long, generation: input_ids[:, -L:]
    target_mask: torch.Tensor | None = None  # [B, L] float, 1 where target_ids is a completion token

    @property
    def kind(self) -> str:
        if self.input_ids.dim() == 3:  # [b, C, T]: one row per choice (data/choice.py)
            return "choice"
        return "classification" if self.choice_ids is not None else "generation"

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn) -> Batch:
        return Batch(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            }
        )

    def index(self, idx) -> Batch:
        """Rows idx (a list or 1-D LongTensor of row numbers; an int keeps the batch dimension)."""
        if isinstance(idx, int):
            idx = [idx]
        return self._map(lambda t: t[idx])

    def slice(self, i: int, j: int) -> Batch:
        return self._map(lambda t: t[i:j])

    def repeat(self, n: int) -> Batch:
        """Tile the rows n times (one copy per replica): row k*B + i of the result is row i."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def to(self, device) -> Batch:
        return self._map(lambda t: t.to(device))


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text (a BOS token, or nothing for SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(full) > len(plain) and full[len(full) - len(plain) :] == plain:
        return list(full[: len(full) - len(plain)])
    return []  # no prefix, or only a suffix (encoder-style tokenizers): add nothing


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0  # masked out anyway


def _tail(ids: list[int], n: int) -> list[int]:
    """Last n tokens (left truncation); n <= 0 gives [] (unlike ids[-0:], which gives all)."""
    return ids[max(0, len(ids) - n) :] if n > 0 else []


def _context(prefix: list[int], prompt: list[int], room: int) -> list[int]:
    """BOS (if any) + as much of the end of the prompt as fits in room tokens."""
    if room <= len(prefix):
        return prefix[:room]
    return prefix + _tail(prompt, room - len(prefix))


def _assemble(rows: list[list[int]], T: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # [B, T]
    for i, row in enumerate(rows):
        if row:
            input_ids[i, T - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, T - len(row) :] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
    return input_ids, attention_mask, position_ids


def _encode_classification(examples: Sequence[Example], tokenizer, T: int) -> Batch:
    n_choices = len(examples[0].choices)
    token_of: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if len(ex.choices) != n_choices:
            raise DataError(
                f"example {i} has {len(ex.choices)} choices, example 0 has {n_choices}: every "
                "example in a batch must have the same number of choices",
                field="choices",
            )
        if ex.label is None or not 0 <= ex.label < len(ex.choices):
            raise DataError(
                f"example {i}: label {ex.label!r} is not an index into its {len(ex.choices)} choices",
                field="label",
            )
        for word in ex.choices:
            if word not in token_of:
                ids = tokenizer(word, add_special_tokens=False)["input_ids"]
                if len(ids) != 1:
                    raise DataError(
                        f"example {i}: choice {word!r} is {len(ids)} tokens {ids}, but classification scores "
                        "one token per choice; pick single-token label words (data.label_words), or score "
                        "multi-token choices (e.g. COPA) as sequences, which encode does not do",
                        field="choices",
                    )
                token_of[word] = ids[0]
    prefix = special_prefix(tokenizer)
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    rows = [_context(prefix, ids, T) for ids in prompts]
    for i, row in enumerate(rows):
        if not row:
            raise DataError(
                f"example {i}: empty prompt (no token to predict the answer from)", field="prompt"
            )
    input_ids, attention_mask, position_ids = _assemble(rows, T, _pad_id(tokenizer))
    choice_ids = torch.tensor(
        [[token_of[w] for w in ex.choices] for ex in examples], dtype=torch.long
    )  # [B, C]
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)  # [B]
    return Batch(input_ids, attention_mask, position_ids, choice_ids=choice_ids, labels=labels)


def check_target_length(T: int, L: int, what: str) -> None:
    """A target of L tokens fits a row of T: its first token is predicted from the position
    before it, so at least one context position is left."""
    if not 1 <= L < T:
        raise DataError(
            f"max_target_length {L} must be at least 1 and below max_length {T} (the first token "
            f"of {what} is predicted from the position before it)",
            field="data.max_target_length",
        )


def _encode_generation(examples: Sequence[Example], tokenizer, T: int, L: int) -> Batch:
    check_target_length(T, L, "a completion")
    for i, ex in enumerate(examples):
        if ex.target is None:
            raise DataError(f"example {i} has no target (not a generation example)", field="target")
    prefix = special_prefix(tokenizer)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    targets = tokenizer([ex.target for ex in examples], add_special_tokens=False)["input_ids"]
    rows, n_target, n_context = [], [], []
    for i, (ex, ids, tgt) in enumerate(zip(examples, prompts, targets)):
        if ex.origin is not None and len(tgt) + len(eos) > L:  # a user's record: never cut silently
            raise DataError(
                f"example {i}: completion is {len(tgt)} tokens{' + end-of-text' if eos else ''}, "
                f"more than data.max_target_length={L}",
                field="completion",
                **ex.where(),
            )
        completion = (tgt + eos)[:L]  # completion keeps its beginning; the prompt loses its beginning
        context = _context(prefix, ids, T - len(completion))
        rows.append(context + completion)
        n_target.append(len(completion))
        n_context.append(len(context))
    input_ids, attention_mask, position_ids = _assemble(rows, T, _pad_id(tokenizer))
    target_ids = input_ids[:, T - L :].clone()  # [B, L]
    target_mask = torch.zeros((len(rows), L), dtype=torch.float32)  # [B, L]
    for i, (c, ctx) in enumerate(zip(n_target, n_context)):
        target_mask[i, L - c :] = 1.0
        if ctx == 0 and c > 0:
            # Nothing precedes the first completion token (empty prompt, no BOS): it cannot be predicted.
            target_mask[i, L - c] = 0.0
    return Batch(input_ids, attention_mask, position_ids, target_ids=target_ids, target_mask=target_mask)


def encode(
    examples: Sequence[Example],
    tokenizer,
    max_length: int,
    max_target_length: int,
    kind: str,
    length_normalize: bool = False,
) -> Batch:
    """Tokenize examples into one Batch of shape [len(examples), max_length] ([.., C, ..] for choice)."""
    if kind not in KINDS:
        raise DataError(f"unknown kind {kind!r} (expected one of {list(KINDS)})", field="kind")
    if not examples:
        raise DataError("no examples to encode")
    if max_length < 1:
        raise DataError(f"max_length must be positive, got {max_length}", field="data.max_length")
    if kind == "classification":
        return _encode_classification(examples, tokenizer, max_length)
    if kind == "choice":
        from zotune.data.choice import encode_choice

        return encode_choice(examples, tokenizer, max_length, max_target_length, length_normalize)
    if kind == "chat":
        from zotune.data.chat import encode_chat

        return encode_chat(examples, tokenizer, max_length, max_target_length)
    return _encode_generation(examples, tokenizer, max_length, max_target_length)
