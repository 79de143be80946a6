"""An adapter file is the same bytes whatever order the safetensors writer puts its metadata in."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save

from zotune.adapters.peft_io import _sorted_metadata


def test_metadata_order_does_not_change_the_bytes():
    tensors = {"b": torch.arange(5.0), "a": torch.ones(3, 2)}
    one = save(tensors, metadata={"zotune": json.dumps({"model": "x"}), "format": "pt"})
    other = save(tensors, metadata={"format": "pt", "zotune": json.dumps({"model": "x"})})
    assert _sorted_metadata(one) == _sorted_metadata(other)
    out = _sorted_metadata(one)
    assert len(out) == len(one)
    n = int.from_bytes(out[:8], "little")
    assert list(json.loads(out[8 : 8 + n])["__metadata__"]) == ["format", "zotune"]
    back = load(out)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
