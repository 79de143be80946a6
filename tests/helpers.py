"""Small builders shared by tests: a synthetic classification batch, randomized tensors, a free
port, command lines for a tiny run and the check that a command is refused with one error line."""

import socket
from pathlib import Path

import torch

POS, NEG = 2731, 3524  # " positive", " negative" in the SmolLM2 vocabulary


def synthetic_batch(b=4, T=12, seed=0, pad=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5000, (b, T), generator=g)
    mask = torch.ones(b, T, dtype=torch.long)
    mask[0, :pad] = 0  # one left-padded row: positions must come from the mask
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    choices = torch.tensor([[POS, NEG]] * b)
    labels = torch.arange(b) % 2
    return ids, mask, pos, choices, labels


def randomize(tensors, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * std)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args_for(model: str, data: str, out: Path, **overrides) -> list[str]:
    """`--section.key value` arguments of a seconds-long run (tiny model, JSONL task)."""
    values = {
        "model.name": model,
        "data.task": f"jsonl:{data}",
        "data.train_size": 40,
        "data.dev_size": 16,
        "data.test_size": 16,
        "data.max_length": 16,
        "adapter.rank": 4,
        "adapter.alpha": 8,
        "optim.q": 2,
        "optim.batch_size": 2,
        "optim.lr": 0.01,
        "train.steps": 6,
        "train.eval_every": 3,
        "train.checkpoint_every": 2,
        "train.eval_batch_size": 8,
        "train.progress": "false",
        "train.out_dir": str(out),
        **overrides,
    }
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def refused(capsys, argv: list[str]) -> str:
    """Runs the command in-process; asserts status 2, exactly one error line and no traceback.
    -> that line."""
    from zotune.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("zotune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
