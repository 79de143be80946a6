"""Full-parameter zeroth-order training (MeZO): every weight of the model is perturbed.

MeZO perturbs weights in place and subtracts the perturbation afterwards; in floating point
(w + d) - d is not always w, so weights drift a little every step. Here the perturbation is applied
where a weight is used instead: a forward pre-hook swaps in w + sign * eps * z for the duration of
one module call, and the stored weight is only ever written by the update. Memory stays at one
module's temporary (as MeZO, no copy of theta) and the weights are restored exactly.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from zotune.adapters.theta import FixedTensors
from zotune.rng import noise


class FullParams(FixedTensors):
    def __init__(self, model: nn.Module):
        self.model = model
        named = list(model.named_parameters())  # tied weights appear once
        for _, p in named:
            p.requires_grad_(False)
        self._name_of = {id(p): name for name, p in named}
        self._lay_out(named)

    def describe(self) -> dict:
        return {"kind": "full"}

    def z(self, seed: torch.Tensor, query: int, name: str, like: torch.Tensor, kind: str) -> torch.Tensor:
        """z of query `query` for the trained tensor `name` (shaped like `like`)."""
        start, n = self.layout.span(name, query)
        return noise(seed, start, n, kind, like.dtype, like.device).view_as(like)

    @contextlib.contextmanager
    def perturbed(self, seed: torch.Tensor, query: int, scale: float, kind: str):
        """Inside the block every module computes with w + scale * z_query(w)."""
        handles = []

        def pre_hook(module, args):
            saved = {}
            for name, p in list(module._parameters.items()):
                if p is None or id(p) not in self._name_of:
                    continue
                saved[name] = p
                module._parameters[name] = p + scale * self.z(seed, query, self._name_of[id(p)], p, kind)
            module._zotune_saved = saved

        def post_hook(module, args, output):
            module._parameters.update(module._zotune_saved)
            del module._zotune_saved

        for module in self.model.modules():
            if any(p is not None for p in module._parameters.values()):
                handles.append(module.register_forward_pre_hook(pre_hook))
                handles.append(module.register_forward_hook(post_hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for module in self.model.modules():  # a forward that raised left weights swapped
                if hasattr(module, "_zotune_saved"):
                    post_hook(module, None, None)
