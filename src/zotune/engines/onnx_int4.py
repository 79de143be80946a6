"""A 4-bit base for the ONNX program: ONNX Runtime's MatMulNBits quantizer on the frozen base
linears only, and the weights ONNX Runtime dequantizes from the blocks (the eager reference of
the parity check).

Which MatMuls are base linears is decided by content, not by name: a MatMul whose constant B is
bit for bit the (transposed) weight of a frozen base linear of the decoder. Everything else stays
fp32: the LoRA bmm against the theta stack (not a constant), LoRA's frozen A (a constant, but
not a base weight), and the LM head rows that score the label words (a Gather, then a MatMul of
a non-constant). Activations stay float (accuracy_level 1: fp32 compute), so the loss
differences behind g are not rounded to an activation grid.
"""

from __future__ import annotations

import hashlib
import logging
import re

import numpy as np
import torch
import torch.nn as nn

from zotune.engines.export_common import EngineError

BITS = 4
ACCURACY_FP32 = 1  # MatMulNBits accuracy_level: compute in fp32 after dequantizing each block


def base_linears(model: nn.Module, adapter) -> dict[str, tuple[torch.Tensor, bool]]:
    """fqn -> (weight, transposed_in_onnx) of every frozen base linear of the decoder: not the
    LM head or embedding (tied or not), not LoRA's tensors (which are not modules)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    skip = {id(m.weight) for m in (head, emb) if m is not None}
    out = {}
    for fqn, m in model.named_modules():
        if m is head or getattr(m, "weight", None) is None or id(m.weight) in skip:
            continue
        if isinstance(m, nn.Linear):
            out[fqn] = (m.weight, True)  # y = x W^T: ONNX MatMul takes W^T
        elif type(m).__name__ == "Conv1D":  # GPT-2: y = x W, W [d_in, d_out]
            out[fqn] = (m.weight, False)
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() + str(a.shape)


def match_base_matmuls(proto, model, adapter) -> dict[str, tuple[str, bool]]:
    """MatMul node name -> (fqn of the base linear whose weight is its constant B, transposed)."""
    from onnx import numpy_helper

    want = {}
    for fqn, (w, transposed) in base_linears(model, adapter).items():
        a = w.detach().float().numpy()
        want[_digest(a.T if transposed else a)] = (fqn, transposed)
    inits = {i.name: i for i in proto.graph.initializer}
    found: dict[str, tuple[str, bool]] = {}
    seen: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if len(init.dims) != 2 or init.data_type != 1:  # 1: FLOAT
            continue
        key = seen.get(init.name)
        if key is None:
            key = seen[init.name] = _digest(numpy_helper.to_array(init))
        if key in want:
            found[node.name] = want[key]
    return found


def quantize_int4(proto, model, adapter, block_size: int, scheme: str = "int4", layers: str | None = None):
    """-> (quantized ModelProto, {MatMulNBits node name: (fqn, transposed)}). scheme: int4
    (symmetric round-to-nearest), int4-zp (with zero points) or int4-hqq (HQQ: scales and zero
    points fitted to each block's weights, no calibration data). layers: a regular expression;
    only base linears whose name it matches (re.search) are quantized."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    nodes = match_base_matmuls(proto, model, adapter)
    if layers is not None:
        nodes = {name: v for name, v in nodes.items() if re.search(layers, v[0])}
        if not nodes:
            raise EngineError(f"--int4-layers {layers!r} matches no base linear of the model")
    if not nodes:
        raise EngineError(
            "int4: no base linear of the model was found as a MatMul with a "
            "constant weight in the exported graph"
        )
    # nodes_to_include adds to op_types_to_quantize: name every other MatMul as excluded.
    others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in nodes]
    hqq = None
    if scheme == "int4-hqq":
        hqq = HQQWeightOnlyQuantConfig(block_size=block_size, bits=BITS, op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(
        proto,
        bits=BITS,
        block_size=block_size,
        is_symmetric=scheme == "int4",
        accuracy_level=ACCURACY_FP32,
        nodes_to_exclude=others,
        op_types_to_quantize=("MatMul",),
        quant_format=QuantFormat.QOperator,
        algo_config=hqq,
    )
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # otherwise one INFO line per node of the graph
    try:
        q.process()
    finally:
        log.setLevel(level)
    out = q.model.model
    renamed = {f"{name}_Q{BITS}": v for name, v in nodes.items()}
    got = {n.name for n in out.graph.node if n.op_type == "MatMulNBits"}
    if got != set(renamed):
        raise EngineError(
            f"int4: the quantizer rewrote {len(got)} MatMuls, {len(renamed)} base "
            f"linears were chosen (e.g. {sorted(got ^ set(renamed))[:2]})"
        )
    return out, renamed


def dequantized_weights(proto, nodes: dict[str, tuple[str, bool]]) -> dict[str, torch.Tensor]:
    """fqn -> the weight ONNX Runtime computes with, in the torch module's layout. Each
    MatMulNBits runs alone on the identity: I_K @ dequant(B) = dequant(B) exactly (one nonzero
    product per output), whatever the packing."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.name not in nodes:
            continue
        fqn, transposed = nodes[node.name]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n = int(attrs["K"]), int(attrs["N"])
        consts = [inits[name] for name in node.input[1:] if name]
        graph = helper.make_graph(
            [helper.make_node("MatMulNBits", ["x", *node.input[1:]], ["y"], domain=node.domain, **attrs)],
            "dequantize",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [k, k])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [k, n])],
            consts,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(node.domain, 1)]
        )
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (w,) = sess.run(None, {"x": np.eye(k, dtype=np.float32)})  # [K, N]
        out[fqn] = torch.from_numpy(w.T.copy() if transposed else w)
    return out
