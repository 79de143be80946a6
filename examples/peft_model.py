"""Train a PEFT LoRA model with zotune's P-RGE step, save it with PEFT, reload it with PEFT.

    python examples/peft_model.py                        # a tiny random Llama (seconds)
    python examples/peft_model.py --model smollm2-135m --out runs/peft-example

The model is an ordinary `peft.get_peft_model` LoRA model. zotune.PRGE finds its LoRA linears and,
during its replica pass, routes each through a zotune layer that shares PEFT's A and B, so all 2q
perturbed replicas still run as one forward. Only B is trained (LoRA-FA: A keeps PEFT's random
init, B starts at PEFT's zeros). The adapter is saved by PEFT itself and reloads unchanged.
"""

import argparse
import json
import tempfile

import torch
from own_loop import FACTS, loss_fn, make_batch
from peft import LoraConfig, PeftModel, get_peft_model

import zotune
from zotune.models import load_model, load_tokenizer
from zotune.models.tiny import make_tiny_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--out", default=None, help="adapter folder (default: a temporary one)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.model == "tiny":
        tokenizer = load_tokenizer("smollm2-135m")
        base = make_tiny_model("llama", tokenizer)
    else:
        base, tokenizer, _ = load_model(args.model)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    model = get_peft_model(base, lora)
    batch = make_batch(tokenizer, FACTS)

    est = zotune.PRGE(model, loss_fn, q=4, eps=1e-2, lr=args.lr)
    with torch.no_grad():
        before = float(loss_fn(model, batch).mean())
    for _ in range(args.steps):
        est.step(batch)
    with torch.no_grad():
        after = float(loss_fn(model, batch).mean())
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    out = args.out or tempfile.mkdtemp(prefix="zotune-peft-")
    model.save_pretrained(out)
    # get_peft_model wrapped `base` in place: reload the base model fresh (the tiny one from its seed)
    fresh = make_tiny_model("llama", tokenizer) if args.model == "tiny" else load_model(args.model)[0]
    reloaded = PeftModel.from_pretrained(fresh, out)
    with torch.no_grad():
        again = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    print(
        json.dumps(
            {
                "loss_before": before,
                "loss_after": after,
                "steps": est.steps,
                "trained_values": est.numel,
                "adapter": out,
                "reload_max_abs_diff": float((logits - again).abs().max()),
            }
        )
    )


if __name__ == "__main__":
    main()
