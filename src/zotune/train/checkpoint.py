"""Atomic checkpoints: tensors in safetensors, the rest in JSON, written to a temporary folder and
renamed into place, so a run killed at any moment leaves either the old or the new checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zotune.errors import ZotuneError


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp.", dir=folder.parent))
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        old = folder.with_name(folder.name + ".old")  # killed between the two renames
        if (old / "meta.json").is_file():
            folder = old
        else:
            raise ZotuneError(f"no checkpoint in {folder} (expected meta.json and state.safetensors)")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        tensors = load_file(folder / "state.safetensors")
    except Exception as e:
        raise ZotuneError(f"checkpoint {folder} is unreadable: {e}") from None
    return tensors, meta
