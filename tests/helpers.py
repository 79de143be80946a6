"""Small builders shared by tests: a synthetic classification batch, randomized tensors, a free
port."""

import socket

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
