"""rng.py's noise as native uint32 ONNX ops, for the ONNX exporter.

Traced from PyTorch, the hash runs in int64 (what ExecuTorch needs): every multiply split into
16-bit halves, every right shift of a signed value exported as seven ops (casts to uint64 and
back, the shift, a sign fill and a Where), each over all q * N counters. In ONNX Runtime that chain
was most of the step's activation memory (about 0.9 GB of temporaries at q=4 on SmolLM2) and a
second or more of each step. ONNX has unsigned integers: in uint32 a multiply wraps mod 2^32 by
definition and a shift is one op, as in rng.py's numpy path, so the exported program computes the
same bits in a fraction of the passes and half the bytes each.

The exporter routes `rng.noise` to the custom op `zotune::noise` while it traces
(`rng.traced_noise`) and hands `TRANSLATION` to torch.onnx.export, which emits `onnx_noise` in its
place. The op's eager and fake implementations are rng.py's own.
"""

from __future__ import annotations

import torch

from zotune import rng


@torch.library.custom_op("zotune::noise", mutates_args=())
def noise_op(seed: torch.Tensor, start: int, n: int, rademacher: bool) -> torch.Tensor:
    index = torch.arange(start, start + n, dtype=torch.int64)
    return rng._noise(seed, index, "rademacher" if rademacher else "normal", torch.float32)


@noise_op.register_fake
def _(seed, start, n, rademacher):
    return seed.new_empty((n,), dtype=torch.float32)


def traced(seed: torch.Tensor, start: int, n: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """What rng.noise returns under tracing while the exporter routes it here."""
    if dtype != torch.float32 or kind not in ("normal", "rademacher"):
        raise ValueError(f"ONNX noise: float32 normal or rademacher only, got {kind} {dtype}")
    return torch.ops.zotune.noise(seed.reshape(-1)[:1], int(start), int(n), kind == "rademacher")


def onnx_noise(seed, start: int, n: int, rademacher: bool):
    """The ONNX graph of noise_op: the same arithmetic as rng._hash_np, in uint32."""
    from onnx import TensorProto
    from onnxscript import opset20 as op

    u32, u64 = TensorProto.UINT32, TensorProto.UINT64

    def const(v: int):
        return op.Cast(op.Constant(value_int=v), to=u32)  # int64 constant, exact in uint32

    def mix(x):  # lowbias32, as rng._mix32
        x = op.BitwiseXor(x, op.BitShift(x, const(16), direction="RIGHT"))
        x = op.Mul(x, const(0x7FEB352D))
        x = op.BitwiseXor(x, op.BitShift(x, const(15), direction="RIGHT"))
        x = op.Mul(x, const(0x846CA68B))
        return op.BitwiseXor(x, op.BitShift(x, const(16), direction="RIGHT"))

    mask = op.Constant(value_int=rng.MASK32)
    key = mix(op.Cast(op.BitwiseAnd(op.Reshape(seed, op.Constant(value_ints=[1])), mask), to=u32))
    end = start + n
    if end <= 2**31:  # the counters fit int32: no int64 array of n at all
        lo = op.Cast(op.Range(_i32(start), _i32(end), _i32(1)), to=u32)
        hi = None
    else:
        index = op.Range(op.Constant(value_int=start), op.Constant(value_int=end), op.Constant(value_int=1))
        lo = op.Cast(op.BitwiseAnd(index, mask), to=u32)
        shift = op.Cast(op.Constant(value_int=32), to=u64)
        hi = op.Cast(op.BitShift(op.Cast(index, to=u64), shift, direction="RIGHT"), to=u32)
    x = mix(op.BitwiseXor(lo, key))
    if hi is not None:
        x = op.Add(x, hi)  # wraps mod 2^32
    x = mix(op.BitwiseXor(x, key))
    if rademacher:
        bit = op.Cast(op.BitwiseAnd(x, const(1)), to=TensorProto.FLOAT)
        return op.Sub(op.Mul(bit, op.Constant(value_float=2.0)), op.Constant(value_float=1.0))
    byte = const(255)
    s = op.BitwiseAnd(x, byte)
    for shift in (8, 16):
        s = op.Add(s, op.BitwiseAnd(op.BitShift(x, const(shift), direction="RIGHT"), byte))
    s = op.Add(s, op.BitShift(x, const(24), direction="RIGHT"))  # exact sum of the bytes, [0, 1020]
    centred = op.Sub(op.Cast(s, to=TensorProto.INT32), _i32(rng._IH_MEAN))
    return op.Mul(op.Cast(centred, to=TensorProto.FLOAT), op.Constant(value_float=rng._IH_INV_STD))


def _i32(v: int):
    from onnx import TensorProto
    from onnxscript import opset20 as op

    return op.Cast(op.Constant(value_int=v), to=TensorProto.INT32)


TRANSLATION = {torch.ops.zotune.noise.default: onnx_noise}
