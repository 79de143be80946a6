"""Step sizes that follow the model: the learning rate of step t is divided by a running
statistic of the projected gradients g seen before step t.

g_i = (l+ - l-) / (2 eps) is a directional derivative, so its size is the model's loss scale and
its sensitivity to B: a model whose loss moves four times as much per unit of B gets four times
the update from the same lr, and one recipe cannot fit two model families.
- `rms`: lr / RMS(g). A loss c times larger gives the same update: lr is a step size in
  parameter units (the update per unit of z is about lr).
- `ms`: lr / mean(g^2). Also right when the sensitivity changes: for L(B) = f(kB), g grows by k
  and the curvature by k^2, so the step in B units must shrink by k, and lr * g / mean(g^2) does.
  Measured on SmolLM2-135M and Gemma-3-270M, whose g differ by about 3.5x at B = 0, one lr fits
  both (docs/design.md).

The scale is applied on the host, to the learning rate that every engine already takes as an
input, and it uses only steps before t (an exponential moving average of mean(g^2), bias
corrected). So the exported programs need nothing new, and the replay log, which records the lr
each step was given, rebuilds the adapter exactly without knowing this rule. Step 0 has no
history and gets lr 0; with momentum its g still enters the velocity and is applied from step 1.
"""

from __future__ import annotations

import math

KINDS = ("none", "rms", "ms")


class StepScale:
    def __init__(self, kind: str = "none", decay: float = 0.95):
        if kind not in KINDS:
            raise ValueError(f"unknown step scale '{kind}'")
        self.kind, self.decay = kind, decay
        self.ema, self.seen = 0.0, 0  # EMA of mean(g^2), number of steps folded in

    def lr(self, lr: float) -> float:
        """The lr a step is given, from the schedule's lr."""
        if self.kind == "none":
            return lr
        if self.seen == 0:
            return 0.0
        mean_sq = self.ema / (1.0 - self.decay**self.seen)
        if mean_sq <= 0:
            return 0.0
        return lr / math.sqrt(mean_sq) if self.kind == "rms" else lr / mean_sq

    def update(self, g) -> None:
        """Fold one step's g (a sequence of q floats) into the running scale."""
        if self.kind == "none" or len(g) == 0:
            return
        mean_sq = sum(float(x) ** 2 for x in g) / len(g)
        self.ema = self.decay * self.ema + (1.0 - self.decay) * mean_sq
        self.seen += 1

    def state(self) -> dict:
        return {"ema": self.ema, "seen": self.seen}

    def load_state(self, state: dict) -> None:
        self.ema, self.seen = float(state["ema"]), int(state["seen"])
