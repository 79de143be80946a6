"""First-order backprop on the same trained tensors: the baseline zeroth-order methods must beat
on memory and approach on accuracy."""

from __future__ import annotations

import torch

from zotune.loss import per_replica


class FirstOrder:
    def __init__(
        self,
        model,
        params,
        loss,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
    ):
        self.model, self.params, self.loss = model, params, loss
        tensors = params.tensors()
        for t in tensors:
            t.requires_grad_(True)
        if optimizer == "adamw":
            self.opt = torch.optim.AdamW(tensors, lr=lr, weight_decay=weight_decay)
        else:
            self.opt = torch.optim.SGD(tensors, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def step(self, batch, seed: int, lr: float, eps: float):
        """seed and eps are unused; the signature matches the ZO estimators."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss = per_replica(*self.loss.rows(self.model, *batch), 1)[0]
        loss.backward()
        self.opt.step()
        return float(loss.detach()), torch.zeros(0)

    def state(self) -> dict[str, torch.Tensor]:
        """The optimizer's per-parameter state (moments, step counts) as tensors keyed
        '<parameter index>.<field>', copies."""
        return {
            f"{idx}.{k}": torch.as_tensor(v).clone()
            for idx, st in self.opt.state_dict()["state"].items()
            for k, v in st.items()
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        sd = self.opt.state_dict()
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            idx, k = key.split(".", 1)
            state.setdefault(int(idx), {})[k] = v.clone()
        sd["state"] = state
        self.opt.load_state_dict(sd)
