"""Checkpoints: tensors in safetensors (keys as in engines/base.py), the rest in JSON, in one
folder replaced atomically (zotune.io.atomic_dir): a run killed at any moment leaves either the
old or the new checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zotune.errors import ZotuneError
from zotune.io import atomic_dir, committed_dir


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = committed_dir(folder)
    if not (folder / "meta.json").is_file():
        raise ZotuneError(f"no checkpoint in {folder} (expected meta.json and state.safetensors)")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        tensors = load_file(folder / "state.safetensors")
    except Exception as e:
        raise ZotuneError(f"checkpoint {folder} is unreadable: {e}") from None
    return tensors, meta
