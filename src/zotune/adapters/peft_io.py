"""Adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), which PEFT, vLLM,
llama.cpp's converter and ExecuTorch's LoRA loader read. LoRA-FA saves its frozen A too.

adapter_config.json is PEFT's own LoraConfig, written as PEFT writes it (so it holds PEFT's keys
only); what zotune adds (its version, the adapter kind, the estimator) is in the safetensors
metadata under "zotune"."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from zotune.errors import ZotuneError
from zotune.io import atomic_dir

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def peft_key(layer: str, kind: str) -> str:
    return f"base_model.model.{layer}.{kind}.weight"


def save_peft(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    layers: list[str],
    rank: int,
    alpha: float,
    base_model: str,
    fan_in_fan_out: bool = False,
    dropout: float = 0.0,
    extra: dict | None = None,
) -> Path:
    """state maps '<layer>.lora_A' / '<layer>.lora_B' to tensors; base_model is a zotune model name
    (model.name), written as the folder or hub id PEFT loads it from. Written atomically."""
    from peft import LoraConfig  # imported when an adapter is written: it takes seconds

    folder = Path(folder)
    tensors = {}
    for layer in layers:
        for kind in ("lora_A", "lora_B"):
            tensors[peft_key(layer, kind)] = state[f"{layer}.{kind}"].detach().contiguous()
    config = LoraConfig(
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path(base_model),
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted({layer.rsplit(".", 1)[-1] for layer in layers}),
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        inference_mode=True,
        init_lora_weights=True,
        use_rslora=False,
    ).to_dict()
    # As LoraConfig.save_pretrained writes it, with its sets sorted (the same bytes every time).
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    metadata = {"format": "pt", "zotune": json.dumps({"model": base_model, **(extra or {})})}
    with atomic_dir(folder) as tmp:
        (tmp / WEIGHTS).write_bytes(_sorted_metadata(save(tensors, metadata=metadata)))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def base_model_path(name: str) -> str:
    """The base as PEFT and transformers load it: the model's folder as an absolute path (for an
    embedded model or a GGUF file, the safetensors folder it was converted to), or the hub id."""
    from zotune.models import resolve

    try:
        source = resolve(name)
    except ZotuneError:  # a model that is gone: its name is all there is
        return name
    return source.path if source.kind == "hub" else str(Path(source.path).resolve())


def save_peft_described(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    adapter: dict,
    base_model: str,
    extra: dict | None = None,
) -> Path:
    """save_peft for the adapter a theta layout describes (`ThetaLayout.adapter`)."""
    layers = [name for name, _, _ in adapter["layers"]]
    return save_peft(
        folder,
        state,
        layers,
        adapter["rank"],
        adapter["alpha"],
        base_model,
        adapter["fan_in_fan_out"],
        extra=extra,
    )


def load_peft(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (adapter_config, state keyed like save_peft's input)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ZotuneError(f"adapter folder {folder}: expected {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads((folder / CONFIG).read_text())
        raw = load_file(folder / WEIGHTS)
    except Exception as e:
        raise ZotuneError(f"adapter folder {folder}: unreadable ({e})") from None
    if config.get("peft_type") != "LORA":
        raise ZotuneError(f"{folder / CONFIG}: field 'peft_type': expected LORA")
    state = {}
    for key, value in raw.items():
        if not (key.startswith("base_model.model.") and key.endswith(".weight")):
            raise ZotuneError(f"{folder / WEIGHTS}: unexpected tensor '{key}'")
        state[key[len("base_model.model.") : -len(".weight")]] = value
    return config, state


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors keeps the metadata in a hash map, so its key order in the header differs from
    process to process; with the keys sorted, the same adapter is the same bytes. Only the order
    changes, so the header keeps its length and every offset holds."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # the writer's JSON is compact too: only padding can differ
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]
