"""The engine contract: what the training loop, evaluation and checkpoints need from an engine.

An engine owns the trained tensors (theta) and runs the training step on them; the host chooses
batches, seeds and the learning rate. Every engine (eager PyTorch, an ExecuTorch program, and any
engine added later) implements `Engine`, and the loop, logs, checkpoints and evaluation are
written once against it. tests/engines/test_contract.py is the suite an engine must pass.

Checkpoints are flat dicts of tensors whose keys start with one of the prefixes below, followed by
a trained tensor's name in theta's layout (`param.model.layers.0.self_attn.q_proj.lora_B`) or, for
optimizer state, `opt.<parameter index>.<field>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

PARAM = "param."  # a trained tensor
MOMENTUM = "momentum."  # its ZO-SGD heavy-ball buffer (momentum > 0)
OPT = "opt."  # first-order optimizer state (AdamW moments, SGD momentum)
PREFIXES = (PARAM, MOMENTUM, OPT)


@runtime_checkable
class Engine(Protocol):
    name: str  # "eager", "executorch", ...
    kind: str  # the task kind it trains: "classification" or "generation"

    def step(
        self, batch: tuple[torch.Tensor, ...], seed: int, lr: float, eps: float
    ) -> tuple[float, torch.Tensor]:
        """One training step on the batch (the loss's tensors, `loss.batch_tensors`), updating
        theta in place. -> (mean loss of the step, g [q]; empty for first-order)"""
        ...

    def scores(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Classification: (choice logits [B, C],). Generation: (nll sum [B], token count [B])."""
        ...

    def state(self) -> dict[str, torch.Tensor]:
        """Everything a resume needs, keyed with the prefixes above (copies)."""
        ...

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what `state` returned: the next step is bitwise the one that would have
        followed."""
        ...

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors for a PEFT file: '<layer>.lora_A' / '<layer>.lora_B' (LoRA-FA's
        frozen A included), or the model's parameter names for full-parameter training."""
        ...


def part(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a state dict under one prefix, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of `part`: keys with the prefix added, values copied."""
    return {prefix + k: v.detach().clone() for k, v in tensors.items()}
