"""Generation judged by generation: greedy decoding with a KV cache, scored against the reference by
exact match and token F1 (SQuAD's normalisation: lower case, no punctuation, no articles, single
spaces) and ROUGE-L (F-measure of the longest common token subsequence, for long answers).

Decoding runs the eager model with the adapter applied on the fly: zotune's LoRA layers sit in the
model, so transformers' `generate` (with its KV cache) sees the adapted model; nothing is merged.
The prompt is the same context the model trains on (left-truncated to max_length -
max_target_length tokens) and at most max_target_length tokens are generated. A prediction ends at
the end-of-text token and, when the reference is a single line, at the first line break (the
zero-shot model otherwise goes on to the next question).

Exported programs (ExecuTorch) run the training step and a scoring `forward` over static shapes;
they do not decode. Generation tasks train and are judged in eager PyTorch.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch
from tqdm import tqdm

from zotune.data.tokenize import _context, special_prefix

# The dev score that selects the adapter: token F1 for answers, ROUGE-L for chat replies.
PRIMARY = {"generation": "f1", "chat": "rougeL"}


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)  # LCS by dynamic programming, one row at a time
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def prompt_text(ex, tokenizer) -> str:
    if ex.messages is not None:
        from zotune.data.chat import generation_prompt

        return generation_prompt(tokenizer, ex.messages)
    return ex.prompt


def judgeable(examples: Sequence) -> bool:
    """Generation can be judged when every example has something to answer (a {"text"} LM file has
    empty prompts: it is scored by loss only)."""
    return bool(examples) and all(ex.messages is not None or ex.prompt for ex in examples)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_length: int,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
    chat: bool = False,
) -> list[str]:
    """Greedy continuations of the prompts (KV cache, left padding), decoded without special tokens."""
    prefix = [] if chat else special_prefix(tokenizer)  # a chat template writes its own BOS
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    rows = [_context(prefix, x, max_length - max_new_tokens) for x in ids]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths: less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[str] = [""] * len(rows)
    bar = tqdm(
        range(0, len(rows), batch_size),
        desc="generate",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for start in bar:
        chunk = order[start : start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, i in enumerate(chunk):
            input_ids[k, width - len(rows[i]) :] = torch.tensor(rows[i])
            mask[k, width - len(rows[i]) :] = 1
        gen = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for k, i in enumerate(chunk):
            out[i] = tokenizer.decode(gen[k, width:], skip_special_tokens=True)
    return out


def cut(pred: str, ref: str) -> str:
    return pred.split("\n", 1)[0] if "\n" not in ref.strip() else pred


def score_generations(preds: Sequence[str], refs: Sequence[str]) -> dict:
    preds = [cut(p, r) for p, r in zip(preds, refs)]
    n = max(1, len(refs))
    return {
        "exact_match": sum(map(exact_match, preds, refs)) / n,
        "f1": sum(map(token_f1, preds, refs)) / n,
        "rougeL": sum(map(rouge_l, preds, refs)) / n,
    }


def judge_generation(
    model,
    tokenizer,
    examples: Sequence,
    kind: str,
    max_length: int,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """-> {"exact_match", "f1", "rougeL", "score" (the PRIMARY metric), "examples": a few predictions}"""
    prompts = [prompt_text(ex, tokenizer) for ex in examples]
    preds = generate(
        model, tokenizer, prompts, max_length, max_new_tokens, batch_size, progress, chat=kind == "chat"
    )
    refs = [ex.target.strip() for ex in examples]
    result = score_generations([p.strip() for p in preds], refs)
    result["score"] = result[PRIMARY.get(kind, "f1")]
    result["samples"] = [
        {"prompt": p[-200:], "prediction": cut(x.strip(), r), "reference": r}
        for p, x, r in list(zip(prompts, preds, refs))[:3]
    ]
    return result
