"""The batch an exported training program takes, by the loss it computes.

Every exported program runs `PRGEStep` with one of three losses, and its step's batch inputs are
that loss's tensors (`loss.batch_tensors`) at static shapes (ONNX: one symbolic length T):

    classification  input_ids, attention_mask, position_ids [b, T]; choice_ids [b, C]; labels [b]
    choice          input_ids, attention_mask, position_ids [b, C, T]; target_ids [b, C, L];
                    target_mask [b, C, L] f32; labels [b]
    generation      input_ids, attention_mask, position_ids [b, T]; target_ids [b, L];
                    target_mask [b, L] f32     (chat: the same, with the mask on assistant turns)

C is the label words (classification) or the most choices of any example (choice: an example
with fewer fills its spare rows with a masked copy, data/choice.py); L is data.max_target_length.
The evaluation method takes the same tensors without the labels and returns what the eager
engine's `scores` returns (`loss.score_outputs`): choice logits [be, C], choice scores [be, C],
or the completion's nll sum and token count [be] each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("classification", "choice", "generation")
_INPUTS = {
    "classification": ("input_ids", "attention_mask", "position_ids", "choice_ids", "labels"),
    "choice": ("input_ids", "attention_mask", "position_ids", "target_ids", "target_mask", "labels"),
    "generation": ("input_ids", "attention_mask", "position_ids", "target_ids", "target_mask"),
}
_OUTPUTS = {"classification": ("logits",), "choice": ("logits",), "generation": ("nll", "count")}


def program_kind(kind: str) -> str:
    """The loss an exported program computes for a task kind (chat trains as generation)."""
    return "generation" if kind == "chat" else kind


@dataclass(frozen=True)
class Signature:
    kind: str  # one of KINDS
    n_choices: int = 0  # C (classification, choice)
    n_target: int = 0  # L (choice, generation)

    @classmethod
    def of_meta(cls, meta: dict) -> Signature:
        """The signature a program's metadata describes (programs without a loss field are
        classification programs)."""
        kind = meta.get("loss") or "classification"
        return cls(kind, int(meta.get("n_choices") or 0), int(meta.get("n_target") or 0))

    @property
    def step_inputs(self) -> tuple[str, ...]:
        return _INPUTS[self.kind]

    @property
    def forward_inputs(self) -> tuple[str, ...]:
        names = _INPUTS[self.kind]
        return names[:-1] if names[-1] == "labels" else names

    @property
    def forward_outputs(self) -> tuple[str, ...]:
        return _OUTPUTS[self.kind]

    @property
    def min_length(self) -> int:
        """The shortest row a program takes: the first target token needs a position before it."""
        return max(2, self.n_target + 1)

    @property
    def length_dim(self) -> int:
        """The axis of T in input_ids, attention_mask and position_ids."""
        return 2 if self.kind == "choice" else 1

    def problems(self, seq_len: int) -> list[str]:
        """What is wrong with these sizes for a program of row length seq_len."""
        out = [] if self.kind in KINDS else [f"loss {self.kind!r} (expected one of {list(KINDS)})"]
        if self.kind in ("classification", "choice") and self.n_choices < 2:
            out.append(f"n_choices must be at least 2, got {self.n_choices}")
        if self.kind in ("choice", "generation") and not 1 <= self.n_target < seq_len:
            out.append(f"n_target must be at least 1 and below seq_len {seq_len}, got {self.n_target}")
        return out

    def shapes(self, rows: int, length, forward: bool = False) -> list[tuple]:
        """Shape of each batch input of the step (forward: of the evaluation method)."""
        row = (rows, self.n_choices) if self.kind == "choice" else (rows,)
        per = {
            "input_ids": (*row, length),
            "attention_mask": (*row, length),
            "position_ids": (*row, length),
            "choice_ids": (rows, self.n_choices),
            "labels": (rows,),
            "target_ids": (*row, self.n_target),
            "target_mask": (*row, self.n_target),
        }
        return [per[n] for n in (self.forward_inputs if forward else self.step_inputs)]

    @staticmethod
    def dtype(name: str) -> torch.dtype:
        return torch.float32 if name == "target_mask" else torch.int64

    def check_batch(self, vocab_size: int, rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """A deterministic batch of these shapes (left padding of different lengths; for choice
        a spare, fully masked choice row and length-normalised weights on some rows), for
        tracing and for the parity check of a freshly lowered program."""
        g = torch.Generator().manual_seed(seed)
        lead = (rows, self.n_choices) if self.kind == "choice" else (rows,)
        n = rows * (self.n_choices if self.kind == "choice" else 1)
        ids = torch.randint(3, vocab_size, (n, length), generator=g, dtype=torch.int64)
        am = torch.ones(n, length, dtype=torch.int64)
        room = length // 2 if self.kind == "classification" else length - self.n_target
        for i in range(n):
            am[i, : (i * 3) % max(1, room)] = 0  # left padding; targets keep a position before them
        ids = ids.masked_fill(am == 0, 0)
        pos = (am.cumsum(1) - 1).clamp_min(0)
        common = tuple(x.reshape(*lead, length) for x in (ids, am, pos))
        if self.kind == "classification":
            choice = torch.stack(
                [torch.randperm(vocab_size - 3, generator=g)[: self.n_choices] + 3 for _ in range(rows)]
            ).to(torch.int64)
            labels = torch.randint(0, self.n_choices, (rows,), generator=g, dtype=torch.int64)
            return (*common, choice, labels)
        L = self.n_target
        mask = torch.zeros(n, L, dtype=torch.float32)
        for i in range(n):
            k = 1 + i % L  # target tokens of row i
            mask[i, L - k :] = 1.0 / k if (self.kind == "choice" and i % 2) else 1.0
        targets = (ids[:, length - L :].reshape(*lead, L).contiguous(), mask.reshape(*lead, L))
        if self.kind == "generation":
            return (*common, *targets)
        if self.n_choices > 2:
            targets[1][0, -1] = 0.0  # example 0 has one choice fewer: its last row is a spare
        labels = torch.randint(0, self.n_choices - 1, (rows,), generator=g, dtype=torch.int64)
        return (*common, *targets, labels)
