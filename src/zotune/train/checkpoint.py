"""Checkpoints: tensors in safetensors (keys as in engines/base.py), the rest in JSON, in one
folder replaced atomically (zotune.io.atomic_dir): a run killed at any moment leaves either the
old or the new checkpoint.

meta.json carries the sha256 of the tensor file and of its own other fields, so a checkpoint
changed after it was written (a flipped byte, a hand edit, tensors from another checkpoint) is
an error on resume rather than a silently different run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zotune.errors import FormatError, ZotuneError, reading
from zotune.io import atomic_dir, committed_dir

STATE, META = "state.safetensors", "meta.json"
EXPECTED = "a checkpoint written by zotune (meta.json and state.safetensors)"


def _digest(state: Path, meta: dict) -> str:
    h = hashlib.sha256()
    with open(state, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / STATE)
        (tmp / META).write_text(json.dumps({**meta, "sha256": _digest(tmp / STATE, meta)}, indent=1))


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = committed_dir(folder)
    if not (folder / META).is_file():
        raise ZotuneError(f"no checkpoint in {folder} (expected {META} and {STATE})")
    with reading(folder / STATE, EXPECTED):
        tensors = load_file(folder / STATE)
    with reading(folder / META, EXPECTED):
        meta = json.loads((folder / META).read_bytes().decode("utf-8"))
        if not isinstance(meta, dict):
            raise FormatError(f"expected a JSON object, got {type(meta).__name__}", file=str(folder / META))
        digest = meta.pop("sha256", None)  # checkpoints of older versions carry none
        if digest is not None and digest != _digest(folder / STATE, meta):
            raise FormatError(
                f"{META} and {STATE} do not match the sha256 written with them (changed or "
                "corrupted after the checkpoint was written)",
                file=str(folder),
            )
    return tensors, meta
