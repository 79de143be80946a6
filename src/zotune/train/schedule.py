"""Learning-rate schedules: constant, linear or cosine decay, with linear warm-up."""

from __future__ import annotations

import math


def lr_at(
    step: int, total: int, base_lr: float, schedule: str = "constant", warmup: int = 0, min_ratio: float = 0.0
) -> float:
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule '{schedule}'")
    return base_lr * (min_ratio + (1.0 - min_ratio) * factor)
