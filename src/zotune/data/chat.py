"""Conversations ({"messages": [{"role", "content"}, ...]}) through the model's own chat template,
with the loss on the assistant turns only.

The template renders the whole conversation once. Each assistant turn's characters are found by
rendering the conversation up to that turn twice: with the generation prompt (the text before the
turn) and with the turn (the text after it). A token is trained when it starts inside one of those
spans, read from the fast tokenizer's character offsets, so the split is exact whatever the
template puts around a turn (the end-of-turn token is trained too: the model learns to stop).

The batch is a generation batch: the trained tokens must lie in the last L = data.max_target_length
positions (target_mask is 1 on assistant tokens, 0 on the user and system turns between them), and
a conversation whose assistant part (first assistant token to the end) is longer is an error.

For evaluation by generation (eval_generate.py) the prompt is the conversation before its last
assistant turn with the generation prompt, and the reference is that turn's content.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zotune.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def chat_example(obj: dict, where: dict):
    from zotune.data.task import Example

    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("expected a non-empty list of {role, content} objects", field="messages", **where)
    turns = []
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(
                f"expected an object with string 'role' and 'content', got {m!r:.80}",
                field=f"messages[{k}]",
                **where,
            )
        if m["role"] not in ROLES:
            raise DataError(
                f"unknown role {m['role']!r} (expected one of {list(ROLES)})",
                field=f"messages[{k}].role",
                **where,
            )
        turns.append((m["role"], m["content"]))
    assistant = [c for r, c in turns if r == "assistant"]
    if not assistant:
        raise DataError("conversation has no assistant turn (nothing to train on)", field="messages", **where)
    return Example(
        prompt="", target=assistant[-1], messages=tuple(turns), origin=(where["file"], where["line"])
    )


def _template(tokenizer, turns, generation_prompt: bool = False) -> str:
    msgs = [{"role": r, "content": c} for r, c in turns]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the model's tokenizer has no chat template; chat records need one (or convert "
            "them to {prompt, completion})",
            field="model.name",
        )


def render(
    tokenizer, turns: Sequence[tuple[str, str]], where: dict | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """-> (the rendered conversation, character spans [start, end) of its assistant turns)."""
    _check_template(tokenizer)
    where = where or {}
    full = _template(tokenizer, turns)
    spans = []
    for k, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _template(tokenizer, turns[:k], generation_prompt=True) if k else ""
        upto = _template(tokenizer, turns[: k + 1])
        if (k and not upto.startswith(before)) or not full.startswith(upto):
            raise DataError(
                "the chat template does not render this conversation turn by turn (a prefix "
                "of the conversation renders differently from the start of the whole one), so "
                "the assistant turns cannot be located",
                field=f"messages[{k}]",
                **where,
            )
        spans.append((len(before), len(upto)))
    return full, spans


def generation_prompt(tokenizer, turns: Sequence[tuple[str, str]]) -> str:
    """The conversation before its last assistant turn, ending with the generation prompt."""
    _check_template(tokenizer)
    last = max(k for k, (r, _) in enumerate(turns) if r == "assistant")
    return _template(tokenizer, turns[:last], generation_prompt=True) if last else ""


def encode_chat(examples: Sequence, tokenizer, T: int, L: int):
    from zotune.data.tokenize import Batch, _assemble, _pad_id

    if not 1 <= L < T:
        raise DataError(
            f"max_target_length {L} must be at least 1 and below max_length {T}",
            field="data.max_target_length",
        )
    rows, masks = [], []
    for i, ex in enumerate(examples):
        if ex.messages is None:
            raise DataError(f"example {i} is not a conversation", field="messages")
        text, spans = render(tokenizer, ex.messages, ex.where())
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        trained = [any(s <= start < e for s, e in spans) and end > start for start, end in offsets]
        first = trained.index(True) if any(trained) else None
        if first is None:
            raise DataError(
                f"example {i}: the assistant turns have no tokens", field="messages", **ex.where()
            )
        if len(ids) - first > L:
            raise DataError(
                f"example {i}: the assistant part of the conversation (first assistant token to "
                f"the end) is {len(ids) - first} tokens, more than data.max_target_length={L}",
                field="messages",
                **ex.where(),
            )
        row = ids[max(0, len(ids) - T) :]  # the prompt side loses its beginning
        flags = trained[len(ids) - len(row) :]
        if len(row) == len(ids) and first == 0:
            flags[0] = False  # nothing precedes the first token: it cannot be predicted
        rows.append(row)
        window = flags[max(0, len(flags) - L) :]
        masks.append([0.0] * (L - len(window)) + [float(f) for f in window])
    input_ids, attention_mask, position_ids = _assemble(rows, T, _pad_id(tokenizer))
    target_mask = torch.tensor(masks, dtype=torch.float32)  # [B, L]
    return Batch(
        input_ids,
        attention_mask,
        position_ids,
        target_ids=input_ids[:, T - L :].clone(),
        target_mask=target_mask,
    )
