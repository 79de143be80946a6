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

from zotune.adapters.lora import TrainedTensor
from zotune.rng import noise


class FullParams:
    def __init__(self, model: nn.Module):
        self.model = model
        self.trained: list[TrainedTensor] = []
        self._offset_of: dict[int, int] = {}
        offset = 0
        for name, p in model.named_parameters():  # tied weights appear once
            p.requires_grad_(False)
            self.trained.append(TrainedTensor(name, p, offset))
            self._offset_of[id(p)] = offset
            offset += p.numel()
        self.numel = offset

    def tensors(self) -> list[torch.Tensor]:
        return [t.tensor for t in self.trained]

    def z(self, seed: torch.Tensor, query: int, t: TrainedTensor, kind: str) -> torch.Tensor:
        """z of query `query` for one trained tensor, from the flat counter range."""
        start = query * self.numel + t.offset
        return noise(seed, start, t.tensor.numel(), kind, t.tensor.dtype,
                     t.tensor.device).view_as(t.tensor)

    @contextlib.contextmanager
    def perturbed(self, seed: torch.Tensor, query: int, scale: float, kind: str):
        """Inside the block every module computes with w + scale * z_query(w)."""
        handles = []

        def pre_hook(module, args):
            saved = {}
            for name, p in list(module._parameters.items()):
                if p is None or id(p) not in self._offset_of:
                    continue
                t = TrainedTensor(name, p, self._offset_of[id(p)])
                saved[name] = p
                module._parameters[name] = p + scale * self.z(seed, query, t, kind)
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
