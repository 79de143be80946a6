"""Your own loop, your loss, zotune's P-RGE step.

    python examples/own_loop.py                          # a tiny random Llama (seconds)
    python examples/own_loop.py --model smollm2-135m     # the embedded SmolLM2-135M
    python examples/own_loop.py --dtype bfloat16 --accumulate 2

zotune.PRGE adds LoRA-FA adapters to a plain model (or drives the LoRA layers a PEFT model already
has, see peft_model.py) and runs one forward-only step per call: all 2q perturbed replicas of the
batch in one pass, B <- B - lr * mean_i g_i z_i. With --accumulate the projected gradients g are
averaged over micro-batches (same z) before the one update. A bf16 model trains an fp32 master
copy of B. Prints a JSON line with the loss before and after.
"""

import argparse
import json

import torch
import torch.nn.functional as F

import zotune
from zotune.models import load_model, load_tokenizer
from zotune.models.tiny import make_tiny_model

FACTS = [(f"{a} plus {b} is", f" {a + b}") for a in range(1, 5) for b in range(1, 5)]


def make_batch(tokenizer, pairs):
    """Left-padded prompt + answer rows, with a mask over the answer tokens."""
    rows = [
        (
            tokenizer(p, add_special_tokens=False)["input_ids"],
            tokenizer(a, add_special_tokens=False)["input_ids"],
        )
        for p, a in pairs
    ]
    T = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    attn, answer = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T)
    for i, (p, a) in enumerate(rows):
        ids[i, T - len(p) - len(a) :] = torch.tensor(p + a)
        attn[i, T - len(p) - len(a) :] = 1
        answer[i, T - len(a) :] = 1
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": (attn.cumsum(1) - 1).clamp_min(0),
        "answer_mask": answer,
    }


def loss_fn(model, batch):
    """Mean cross-entropy of each example's answer tokens -> [n] (one loss per example)."""
    logits = (
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        )
        .logits[:, :-1]
        .float()
    )
    nll = F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")  # [n, T-1]
    mask = batch["answer_mask"][:, 1:]
    return (nll * mask).sum(1) / mask.sum(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per update")
    p.add_argument("--lr", type=float, default=2e-2)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.model == "tiny":
        tokenizer = load_tokenizer("smollm2-135m")
        model = make_tiny_model("llama", tokenizer, dtype=getattr(torch, args.dtype))
    else:
        model, tokenizer, _ = load_model(args.model, args.dtype)
    batch = make_batch(tokenizer, FACTS)

    est = zotune.PRGE(model, loss_fn, q=4, eps=1e-2, lr=args.lr, rank=8, alpha=16)
    with torch.no_grad():
        before = float(loss_fn(model, batch).mean())
    n = len(FACTS) // args.accumulate
    for _ in range(args.steps):
        if args.accumulate == 1:
            loss, g = est.step(batch)
        else:
            for k in range(args.accumulate):  # micro-batches: same z, g averaged, one update
                est.accumulate({key: v[k * n : (k + 1) * n] for key, v in batch.items()})
            loss, g = est.apply()
    with torch.no_grad():
        after = float(loss_fn(model, batch).mean())
    print(
        json.dumps(
            {
                "loss_before": before,
                "loss_after": after,
                "steps": est.steps,
                "trained_values": est.numel,
                "fp32_master": est.params.master,
                "last_g": [round(float(x), 4) for x in g],
            }
        )
    )


if __name__ == "__main__":
    main()
