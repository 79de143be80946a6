"""Tiny random causal LMs (a few layers, d=64) of several families, for tests and quick benchmarks.

They share the embedded model's tokenizer so that label words and prompts behave as in real runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "gpt2")


def tiny_config(family: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, tie_word_embeddings=True, use_cache=False)
    if family in ("llama", "qwen2"):
        decoder = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        return {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**decoder, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    raise ValueError(f"unknown tiny family '{family}' (expected one of {FAMILIES})")


def make_tiny_model(family: str, tokenizer, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def save_tiny_model(family: str, tokenizer, folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    model = make_tiny_model(family, tokenizer, seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
