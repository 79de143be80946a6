"""LoRA and LoRA-FA adapters with a replica mode for parallel zeroth-order queries.

y = base(x) + s * (x A^T) B^T with s = alpha / r. LoRA-FA freezes A (seeded init) and trains B
(zero init); LoRA trains both. In replica mode an input of R*b rows is viewed as R replicas, each
with its own perturbed (A, B): the frozen base matmul stays one matmul over all rows and only the
rank-r delta is a batched matmul against the stack of perturbed matrices.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from zotune.adapters.theta import ThetaLayout
from zotune.errors import ConfigError


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    # transformers' Conv1D (GPT-2 family) stores weight as [d_in, d_out]
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def init_lora_a(rank: int, d_in: int, generator: torch.Generator, dtype) -> torch.Tensor:
    """PEFT's default init, kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)), drawn
    from a seeded generator so that A is known from (init_seed, layer order) alone."""
    bound = 1.0 / math.sqrt(d_in)
    a = (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return a.to(dtype)


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        d_in: int,
        d_out: int,
        rank: int,
        alpha: float,
        dropout: float,
        train_a: bool,
        generator: torch.Generator,
    ):
        super().__init__()
        self.base = base
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype, device = base.weight.dtype, base.weight.device  # A is drawn on the CPU generator
        self.lora_A = nn.Parameter(
            init_lora_a(rank, d_in, generator, dtype).to(device), requires_grad=train_a
        )
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=device))
        # Set by an estimator for one forward: (A stack [R, r, d_in] or None, B stack [R, d_out, r]),
        # or a function that builds them when this layer runs.
        self.replicas = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # frozen W x over all rows
        if self.replicas is None:
            xa = F.linear(self.dropout(x), self.lora_A)  # [..., r]
            return y + self.scale * F.linear(xa, self.lora_B)
        a_stack, b_stack = self.replicas() if callable(self.replicas) else self.replicas
        # Stacks built from fp32 master copies of a half-precision model's B (zotune.api) are cast
        # to the activations' dtype here; for stacks already in that dtype .to is a no-op.
        b_stack = b_stack.to(y.dtype)
        a_stack = None if a_stack is None else a_stack.to(x.dtype)
        n_rep = b_stack.shape[0]
        xr = x.reshape(n_rep, -1, self.d_in)  # x: [R*b, T, d_in] -> [R, b*T, d_in]
        if a_stack is None:
            xa = F.linear(xr, self.lora_A)  # [R, b*T, r]
        else:
            xa = torch.bmm(xr, a_stack.transpose(1, 2))  # [R, b*T, r]
        # y += scale * xa B^T in one batched GEMM, in place: y is this call's own fresh output.
        # Out of place, every call allocated a new [rows, d_out] result and copied y into it; on
        # glibc those large blocks come back as fresh pages, and the page faults cost more than
        # all LoRA arithmetic (benchmarks/results/profile-q4-b4.md).
        y.reshape(n_rep, -1, self.d_out).baddbmm_(xa, b_stack.transpose(1, 2), alpha=self.scale)
        return y  # [R*b, T, d_out]

    def merged_weight(self) -> torch.Tensor:
        """The effective [d_out, d_in] weight, for checks against other implementations."""
        w = self.base.weight if isinstance(self.base, nn.Linear) else self.base.weight.t()
        return w + self.scale * self.lora_B @ self.lora_A


def _pattern_matches(patterns: list[str], name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(p == leaf or re.fullmatch(p, name) for p in patterns)


def find_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear layers to adapt. `all-linear` picks every linear in the decoder blocks
    (not the LM head or embeddings); other entries match the leaf name or the full name (regex)."""
    head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if module is head or _in_out(module) is None:
            continue
        if ("all-linear" in patterns and re.search(r"\.\d+\.", name)) or _pattern_matches(patterns, name):
            names.append(name)
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _in_out(m)})
        raise ConfigError(
            f"adapter.targets {patterns} matched no linear layer of "
            f"{type(model).__name__}; its linear layers are named {leaves}"
        )
    return names


class LoRAAdapter:
    """The adapted layers of one model and the flat layout of the tensors zeroth-order trains."""

    def __init__(
        self,
        model: nn.Module,
        rank: int = 16,
        alpha: float = 32.0,
        targets: list[str] | None = None,
        dropout: float = 0.0,
        train_a: bool = False,
        init_seed: int = 0,
    ):
        self.model, self.rank, self.alpha, self.train_a = model, rank, alpha, train_a
        self.init_seed = init_seed
        self.target_patterns = list(targets or ["all-linear"])
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(init_seed)
        self.layers: dict[str, LoRALinear] = {}
        for name in find_targets(model, self.target_patterns):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            d_in, d_out = _in_out(base)
            layer = LoRALinear(base, d_in, d_out, rank, alpha, dropout, train_a, generator)
            setattr(parent, child, layer)
            self.layers[name] = layer
        # (layer, attribute) of every trained tensor, in theta's order. Read through the module
        # at every access: the exporter turns them into buffers, and torch.export swaps buffers
        # for traced values while it runs.
        kinds = ("lora_A", "lora_B") if train_a else ("lora_B",)
        self._slots = [(name, layer, kind) for name, layer in self.layers.items() for kind in kinds]
        self.layout = ThetaLayout.from_adapter(self)
        self.numel = self.layout.numel

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"{name}.{kind}", getattr(layer, kind)) for name, layer, kind in self._slots]

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(layer, kind) for _, layer, kind in self._slots]

    def describe(self) -> dict:
        """What replay and the exporters need to rebuild or check this adapter without the
        model (the `adapter` part of its theta layout)."""
        return {
            "kind": "lora" if self.train_a else "lora-fa",
            "rank": self.rank,
            "alpha": self.alpha,
            "init_seed": self.init_seed,
            "targets": list(self.target_patterns),
            "layers": [[name, layer.d_in, layer.d_out] for name, layer in self.layers.items()],
            "fan_in_fan_out": self.fan_in_fan_out,
        }

    def state(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (A and B), keyed by layer name, cloned."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_A"] = layer.lora_A.detach().clone()
            out[f"{name}.lora_B"] = layer.lora_B.detach().clone()
        return out

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers.items():
            for kind in ("lora_A", "lora_B"):
                key = f"{name}.{kind}"
                if key not in state:
                    raise ConfigError(f"adapter state has no tensor '{key}'")
                getattr(layer, kind).copy_(state[key])

    @property
    def fan_in_fan_out(self) -> bool:
        return any(not isinstance(layer.base, nn.Linear) for layer in self.layers.values())

    def set_replicas(self, stacks: dict | None):
        """stacks: layer name -> (A stack or None, B stack), or a function that returns them."""
        for name, layer in self.layers.items():
            layer.replicas = None if stacks is None else stacks[name]
