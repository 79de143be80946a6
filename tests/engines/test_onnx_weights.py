"""Lifting the base weights out of ONNX graphs: one entry per distinct tensor, inputs named by
content, bound without a copy to several sessions, and the inverse that makes a graph
self-contained again."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from zotune.engines.onnx_weights import (  # noqa: E402
    MIN_BYTES,
    PREFIX,
    bound_values,
    inline_weights,
    lift_weights,
    load_weights,
    save_weights,
)
from zotune.engines.ort import inference_session  # noqa: E402

D = 32  # a 32 x 32 fp32 weight is 4 KiB: just at the lifting threshold


def _graph(name: str, w: np.ndarray, w2: np.ndarray):
    """y = (x @ W) @ W2 + bias; the bias is small and stays an initializer."""
    d = w.shape[0]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", d])
    inits = [
        numpy_helper.from_array(w, f"{name}_w"),
        numpy_helper.from_array(w2, f"{name}_w2"),
        numpy_helper.from_array(np.ones(d, np.float32), f"{name}_bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", f"{name}_w"], ["h"]),
        helper.make_node("MatMul", ["h", f"{name}_w2"], ["h2"]),
        helper.make_node("Add", ["h2", f"{name}_bias"], ["y"]),
    ]
    return helper.make_model(
        helper.make_graph(nodes, name, [x], [y], inits), opset_imports=[helper.make_opsetid("", 20)]
    )


def _run(sess, x, values) -> np.ndarray:
    io = sess.io_binding()
    io.bind_cpu_input("x", x)
    for i in sess.get_inputs()[1:]:
        io.bind_ortvalue_input(i.name, values[i.name])
    io.bind_output("y", "cpu")
    sess.run_with_iobinding(io)
    return io.get_outputs()[0].numpy()


def test_lift_dedups_binds_without_copy_and_inlines_back(tmp_path):
    rng = np.random.default_rng(0)
    w, w2 = (rng.standard_normal((D, D)).astype(np.float32) for _ in range(2))
    assert w.nbytes == MIN_BYTES
    x = rng.standard_normal((5, D)).astype(np.float32)
    # The same W under other names in two graphs, and twice in one graph (a tied weight).
    protos = {"a": _graph("a", w, w2), "b": _graph("b", w, w.copy())}
    tensors = lift_weights(protos)
    assert len(tensors) == 2  # W and W2, each once
    for proto in protos.values():
        assert [i.name for i in proto.graph.initializer] == [f"{proto.graph.name}_bias"]
        names = [i.name for i in proto.graph.input]
        assert names[0] == "x" and all(n.startswith(PREFIX) for n in names[1:])
    assert len(protos["b"].graph.input) == 2  # W used twice: one input
    w_key = protos["b"].graph.input[1].name

    # Through the weights file; both sessions bind the same host memory.
    path = tmp_path / "w.safetensors"
    path.write_bytes(save_weights(tensors))
    held = load_weights(path)
    assert all(np.array_equal(held[k], tensors[k]) for k in tensors)
    values = bound_values(held)
    sess = {k: inference_session(p.SerializeToString(), threads=1) for k, p in protos.items()}
    np.testing.assert_allclose(_run(sess["a"], x, values), (x @ w) @ w2 + 1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(sess["b"], x, values), (x @ w) @ w + 1, rtol=1e-5, atol=1e-5)
    held[w_key] += 1.0  # seen by both sessions: the bound values are the host arrays, not copies
    np.testing.assert_allclose(_run(sess["a"], x, values), (x @ (w + 1)) @ w2 + 1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_run(sess["b"], x, values), (x @ (w + 1)) @ (w + 1) + 1, rtol=1e-4, atol=1e-4)

    # The inverse: a self-contained model that plain ONNX Runtime runs with x alone.
    alone = inline_weights(protos["b"], tensors)
    plain = inference_session(alone.SerializeToString(), threads=1)
    assert [i.name for i in plain.get_inputs()] == ["x"]
    np.testing.assert_allclose(plain.run(None, {"x": x})[0], (x @ w) @ w + 1, rtol=1e-5, atol=1e-5)


def test_small_initializers_stay_in_the_graph():
    w = np.eye(4, dtype=np.float32)  # 64 bytes
    protos = {"a": _graph("a", w, w)}
    before = [i.name for i in protos["a"].graph.initializer]
    assert lift_weights(protos) == {}
    assert [i.name for i in protos["a"].graph.initializer] == before
    assert [i.name for i in protos["a"].graph.input] == ["x"]
