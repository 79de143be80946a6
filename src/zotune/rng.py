"""Seeded random numbers that every engine reproduces bit for bit.

z is a pure function of (seed, index) built only from int64 and/xor/shift/mul/add and arange:
eager PyTorch, ExecuTorch and ONNX Runtime compute the same bits (docs/design.md, "Random
numbers"). The host never stores z; a run is fully described by its (seed, g) log.

Values stay in uint32 range inside int64, and every multiply is split into 16-bit halves so no
product overflows int64. Shifts use the torch.bitwise_*_shift functions because Python's >> and <<
export to ops that have no ExecuTorch kernel.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
# Irwin-Hall: the sum of four uniform 8-bit fields has mean 4 * 127.5 and variance 4 * (256^2 - 1) / 12.
_IH_MEAN = 510
_IH_INV_STD = 1.0 / (4 * (256**2 - 1) / 12) ** 0.5


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bitwise_right_shift(x, k)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x < 2^32, with both partial products below 2^48.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + torch.bitwise_left_shift(torch.bitwise_and(x * hi, 0xFFFF), 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32 (Chris Wellons): a bijection on uint32 with good avalanche.
    x = torch.bitwise_xor(x, _shr(x, 16))
    x = _mul32(x, 0x7FEB352D)
    x = torch.bitwise_xor(x, _shr(x, 15))
    x = _mul32(x, 0x846CA68B)
    return torch.bitwise_xor(x, _shr(x, 16))


def hash32(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """uint32 hash (in int64) of a seed (int64 tensor, any broadcastable shape) and counters."""
    key = _mix32(torch.bitwise_and(seed, MASK32))
    hi = torch.bitwise_and(_shr(index, 32), MASK32)
    x = _mix32(torch.bitwise_xor(torch.bitwise_and(index, MASK32), key))
    return _mix32(torch.bitwise_xor(x + hi, key) & MASK32)


def noise(
    seed: torch.Tensor,
    start: int,
    n: int,
    kind: str = "normal",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """z[start : start + n] of the stream named by seed (an int64 tensor of shape [] or [1]),
    made on `device`."""
    if torch.compiler.is_compiling() and _TRACED["noise"] is not None:  # an exporter's own op
        return _TRACED["noise"](seed, start, n, kind, dtype)
    if _numpy_path(kind, dtype, torch.device(device)):
        # Eager CPU: counters made per chunk, never an [n] int64 array (320 MB at q=16 on
        # SmolLM2).
        return _noise_np(int(seed.reshape(-1)[0]), kind, dtype, start=start, n=n)
    index = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return noise_at(seed, index, kind, dtype)


# While an exporter traces: a function (seed, start, n, kind, dtype) -> z that emits the same bits
# in the target's own ops (engines/onnx_rng.py); None: the int64 op chain below.
_TRACED = {"noise": None}


@contextlib.contextmanager
def traced_noise(fn):
    """Route noise() to fn while tracing (the ONNX exporter's uint32 op)."""
    saved, _TRACED["noise"] = _TRACED["noise"], fn
    try:
        yield
    finally:
        _TRACED["noise"] = saved


def _numpy_path(kind: str, dtype: torch.dtype, device: torch.device) -> bool:
    return (
        not torch.compiler.is_compiling()
        and device.type == "cpu"
        and dtype in _NP_FLOAT
        and kind in ("normal", "rademacher")
    )


# Eager hashing runs in cache-sized chunks: the hash is memory-bound on large arrays (torch
# int64, 10M values: 3.4 s in one go, 0.31 s in chunks of 16K, 2 threads).
_CHUNK = 1 << 14


def noise_at(
    seed: torch.Tensor, index: torch.Tensor, kind: str = "normal", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """z at the given int64 counters (any shape, on the device z is wanted on): the same values
    as noise() over a range."""
    if torch.compiler.is_compiling():
        return _noise(seed, index, kind, dtype)  # one op chain: what exported programs run
    if _numpy_path(kind, dtype, index.device):
        return _noise_np(int(seed.reshape(-1)[0]), kind, dtype, index=index)
    if index.device.type != "cpu":  # an accelerator: the whole op chain at once, on it
        return _noise(seed.to(index.device), index, kind, dtype)
    if index.numel() > _CHUNK:
        flat = index.reshape(-1)
        out = torch.empty(flat.shape, dtype=dtype)
        for start in range(0, flat.numel(), _CHUNK):
            out[start : start + _CHUNK] = _noise(seed, flat[start : start + _CHUNK], kind, dtype)
        return out.reshape(index.shape)
    return _noise(seed, index, kind, dtype)


# The same hash in numpy uint32, for eager use: unsigned arithmetic wraps mod 2^32 by definition,
# so a multiply is one pass instead of six and every pass moves half the bytes (measured 10M
# normal values: about 6x faster than the chunked torch path). Bit-identical to _noise (tested).
_NP_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}
_NP_CHUNK = 1 << 16


def _mix32_np(x: np.ndarray, t: np.ndarray) -> None:
    """lowbias32 in place on uint32 x, with t as scratch."""
    np.right_shift(x, 16, out=t)
    np.bitwise_xor(x, t, out=x)
    np.multiply(x, np.uint32(0x7FEB352D), out=x)
    np.right_shift(x, 15, out=t)
    np.bitwise_xor(x, t, out=x)
    np.multiply(x, np.uint32(0x846CA68B), out=x)
    np.right_shift(x, 16, out=t)
    np.bitwise_xor(x, t, out=x)


def _hash_np(key, part: np.ndarray, kind: str, dst: np.ndarray) -> None:
    """The noise of uint64 counters `part` into dst (the same arithmetic as _noise)."""
    ftype = dst.dtype.type
    hi = (part >> np.uint64(32)).astype(np.uint32)
    x = part.astype(np.uint32)  # low 32 bits
    t = np.empty_like(x)
    np.bitwise_xor(x, key, out=x)
    _mix32_np(x, t)
    np.add(x, hi, out=x)  # wraps mod 2^32, as (x + hi) & MASK32 does
    np.bitwise_xor(x, key, out=x)
    _mix32_np(x, t)
    if kind == "rademacher":
        np.bitwise_and(x, 1, out=t)
        np.multiply(t.astype(ftype), 2, out=dst)
        np.subtract(dst, 1, out=dst)
        return
    s = np.bitwise_and(x, 255)  # exact integer sum of the four bytes, in [0, 1020]
    for shift in (8, 16):
        np.right_shift(x, shift, out=t)
        np.bitwise_and(t, 255, out=t)
        np.add(s, t, out=s)
    np.right_shift(x, 24, out=t)
    np.add(s, t, out=s)
    s = s.astype(np.int32) - _IH_MEAN
    np.multiply(s.astype(ftype), ftype(_IH_INV_STD), out=dst)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="zotune-rng")
    return _POOLS[workers]


def _noise_np(
    seed: int, kind: str, dtype: torch.dtype, index: torch.Tensor | None = None, start: int = 0, n: int = 0
) -> torch.Tensor:
    """Noise at the int64 counters `index`, or at start .. start + n. Large draws are split over
    torch's thread count (numpy releases the GIL): at q=16 on SmolLM2 the draw was 8 % of a step."""
    k = np.array([seed & MASK32], dtype=np.uint32)
    _mix32_np(k, np.empty_like(k))
    key = k[0]
    idx = None if index is None else index.reshape(-1).numpy().view(np.uint64)
    size = n if idx is None else idx.size
    out = np.empty(size, dtype=_NP_FLOAT[dtype])

    def span(lo: int, hi: int) -> None:
        for c in range(lo, hi, _NP_CHUNK):
            e = min(c + _NP_CHUNK, hi)
            part = np.arange(start + c, start + e, dtype=np.uint64) if idx is None else idx[c:e]
            _hash_np(key, part, kind, out[c:e])

    workers = min(torch.get_num_threads(), size // (4 * _NP_CHUNK))
    if workers <= 1:
        span(0, size)
    else:
        bounds = [size * w // workers // _NP_CHUNK * _NP_CHUNK for w in range(workers)] + [size]
        list(_pool(workers).map(span, bounds[:-1], bounds[1:]))
    shape = (n,) if index is None else index.shape
    return torch.from_numpy(out).reshape(shape)


def _noise(seed: torch.Tensor, index: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    h = hash32(seed.reshape(-1)[:1], index)
    if kind == "rademacher":
        return (torch.bitwise_and(h, 1) * 2 - 1).to(dtype)
    if kind == "normal":
        s = (
            torch.bitwise_and(h, 255)
            + torch.bitwise_and(_shr(h, 8), 255)
            + torch.bitwise_and(_shr(h, 16), 255)
            + _shr(h, 24)
        )  # exact integer sum in [0, 1020]
        return (s - _IH_MEAN).to(dtype) * _IH_INV_STD
    raise ValueError(f"unknown noise kind '{kind}' (expected normal or rademacher)")


def step_seed(run_seed: int, step: int) -> int:
    """The seed of one training step, derived from (run seed, step) on the host."""
    s = torch.tensor([run_seed & MASK32], dtype=torch.int64)
    return int(hash32(s, torch.tensor([step], dtype=torch.int64)).item())
