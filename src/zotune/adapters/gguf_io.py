"""Adapters where people serve models: a PEFT adapter folder as a llama.cpp LoRA adapter (GGUF), or
merged into the base model as a safetensors folder.

GGUF, as llama.cpp's convert_lora_to_gguf.py writes it and llama.cpp's adapter loader checks it:
- metadata general.architecture (the base model's, e.g. "llama"), general.type "adapter",
  adapter.type "lora", adapter.lora.alpha (float32);
- per adapted linear two float32 tensors named after the base tensor, "<base>.lora_a" (numpy shape
  [r, d_in]) and "<base>.lora_b" ([d_out, r]), e.g. blk.3.attn_q.weight.lora_a; names come from
  gguf-py's tensor-name map for the architecture;
- for the llama architecture the converter stores attn_q / attn_k rows permuted per head (so
  llama.cpp's rotary layout applies), so lora_b of q_proj / k_proj is permuted the same way
  (a row permutation of W + s B A is the same permutation of B).

Merged: W <- W + (alpha / r) B A for every adapted layer, written with save_pretrained
(safetensors) with the base model's tokenizer, atomically.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from zotune.adapters.peft_io import load_peft
from zotune.errors import ZotuneError
from zotune.io import atomic_dir, atomic_write_bytes

# Hugging Face model_type -> (gguf-py architecture name, q/k rows permuted by the converter)
ARCHS = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "gpt2": ("GPT2", False),
    "gemma3_text": ("GEMMA3", False),
    "gemma3": ("GEMMA3", False),
}


def permute_rows(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's converter permutation of q/k rows (LlamaModel.permute). w: [d_out, ...]"""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _base_config(base: str) -> tuple[dict, Path]:
    from zotune.models import resolve

    source = resolve(base)
    path = Path(source.path) / "config.json"
    if source.kind == "hub" or not path.is_file():
        raise ZotuneError(
            f"base model '{base}': needs a local model (embedded name, folder or .gguf) "
            "to read its architecture"
        )
    return json.loads(path.read_text()), Path(source.path)


def _scale(config: dict) -> float:
    if config.get("use_rslora"):
        raise ZotuneError("adapter_config.json: field 'use_rslora': rsLoRA scaling is not supported")
    return float(config["lora_alpha"]) / int(config["r"])


def export_gguf(adapter_dir: str | Path, out: str | Path, base: str | None = None) -> Path:
    import gguf

    config, state = load_peft(adapter_dir)
    base = base or config.get("base_model_name_or_path")
    hf, _ = _base_config(base)
    model_type = hf.get("model_type")
    if model_type not in ARCHS:
        raise ZotuneError(
            f"base model '{base}': architecture '{model_type}' has no GGUF mapping "
            f"(supported: {sorted(ARCHS)})"
        )
    arch_name, permuted = ARCHS[model_type]
    arch = gguf.MODEL_ARCH[arch_name]
    n_layers = hf.get("num_hidden_layers", hf.get("n_layer"))
    names = gguf.get_tensor_name_map(arch, n_layers)
    n_head = hf.get("num_attention_heads", hf.get("n_head"))
    n_head_kv = hf.get("num_key_value_heads", n_head)
    tensors = []
    for key in sorted(k for k in state if k.endswith(".lora_A")):
        layer = key[: -len(".lora_A")]
        a, b = state[key].float(), state[f"{layer}.lora_B"].float()  # [r, d_in], [d_out, r]
        if config.get("fan_in_fan_out") and model_type != "gpt2":
            raise ZotuneError(f"{adapter_dir}: fan_in_fan_out adapters are only mapped for GPT-2")
        target = names.get_name(layer + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ZotuneError(f"{adapter_dir}: layer '{layer}' has no {arch_name} GGUF tensor name")
        if permuted and layer.endswith("q_proj"):
            b = permute_rows(b, n_head, n_head)
        elif permuted and layer.endswith("k_proj"):
            b = permute_rows(b, n_head, n_head_kv)
        tensors.append((f"{target}.lora_a", a.contiguous().numpy()))
        tensors.append((f"{target}.lora_b", b.contiguous().numpy()))

    # GGUFWriter writes to a path: built in a scratch folder, then swapped in by the atomic writer
    # (an adapter is a few MB).
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch) / "adapter.gguf"
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(config["lora_alpha"]))
        for name, data in tensors:
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return atomic_write_bytes(out, tmp.read_bytes())


@torch.no_grad()
def merge_into(model, config: dict, state: dict[str, torch.Tensor]) -> None:
    """W <- W + s B A for every layer of state (keys '<layer>.lora_A' / '.lora_B')."""
    scale = _scale(config)
    for key in [k for k in state if k.endswith(".lora_A")]:
        layer = key[: -len(".lora_A")]
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise ZotuneError(f"adapter layer '{layer}' is not a module of {type(model).__name__}") from None
        delta = scale * state[f"{layer}.lora_B"].double() @ state[key].double()  # [d_out, d_in]
        w = module.weight
        if tuple(w.shape) == tuple(delta.shape[::-1]) and type(module).__name__ == "Conv1D":
            delta = delta.t()  # GPT-2's Conv1D stores [d_in, d_out]
        if tuple(w.shape) != tuple(delta.shape):
            raise ZotuneError(
                f"adapter layer '{layer}': B A is {tuple(delta.shape)}, the weight {tuple(w.shape)}"
            )
        w.add_(delta.to(w.dtype))


def export_merged(adapter_dir: str | Path, out: str | Path, base: str | None = None) -> Path:
    from zotune.models import load_model

    config, state = load_peft(adapter_dir)
    base = base or config.get("base_model_name_or_path")
    _base_config(base)
    model, tokenizer, _ = load_model(base)
    merge_into(model, config, state)
    model.config.use_cache = True  # a served model decodes with its cache
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)
