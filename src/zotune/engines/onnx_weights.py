"""The base weights of an ONNX program, held once for both graphs.

Kept as initializers, each InferenceSession owns the weights it was given: the step graph and the
evaluation graph each hold a copy of the model, and ONNX Runtime prepacks a third and fourth for
its matmuls, which roughly doubles the runtime's memory against eager PyTorch. Instead the exporter
turns every large initializer into a graph input named by its content (`w.<sha256 prefix>`),
and writes each distinct tensor once to `<program>.weights.safetensors`; the host reads that file
once and binds the same ONNX Runtime values to both sessions by I/O binding, as it binds theta.
Identical tensors (the same base linear in both graphs, a tied embedding) share one entry, so the
program's files also hold the model once.

The cost: a weight that is an input cannot be prepacked at load, so each MatMul packs its B as it
runs, which at the step's sizes costs nothing measurable (docs/onnx.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

PREFIX = "w."
# Smaller initializers (norm scales, shape constants, quantization scales of small layers) stay in
# the graphs: ONNX Runtime folds and fuses around constants, and they add up to little.
MIN_BYTES = 4096


def weights_path(path: str | Path) -> Path:
    return Path(str(path) + ".weights.safetensors")


def _key(a: np.ndarray) -> str:
    h = hashlib.sha256(a.dtype.str.encode() + str(a.shape).encode() + a.tobytes()).hexdigest()
    return PREFIX + h[:24]


def lift_weights(protos: dict, min_bytes: int = MIN_BYTES) -> dict[str, np.ndarray]:
    """Turn each large initializer of every graph in `protos` (name -> onnx.ModelProto, changed
    in place) into a graph input named by its content. Returns key -> array, one per distinct
    tensor."""
    from onnx import helper, numpy_helper

    tensors: dict[str, np.ndarray] = {}
    for graph_name, proto in protos.items():
        graph = proto.graph
        if any(a.type in (5, 10) for n in graph.node for a in n.attribute):  # GRAPH, GRAPHS
            raise ValueError(f"{graph_name}: a graph with subgraphs cannot have its weights lifted")
        rename, keep, keys = {}, [], []
        for init in graph.initializer:
            a = numpy_helper.to_array(init)
            if a.nbytes < min_bytes:
                keep.append(init)
                continue
            key = _key(np.ascontiguousarray(a))
            rename[init.name] = key
            if key not in keys:
                keys.append(key)
                tensors.setdefault(key, np.ascontiguousarray(a))
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        for key in keys:
            t = tensors[key]
            elem = helper.np_dtype_to_tensor_dtype(t.dtype)
            graph.input.append(helper.make_tensor_value_info(key, elem, list(t.shape)))
    return tensors


def save_weights(tensors: dict[str, np.ndarray]) -> bytes:
    """The weights file's bytes (safetensors: any tool can read it)."""
    from safetensors.numpy import save

    return save(tensors)


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """key -> array, each read once into memory of its own (ONNX Runtime binds it without a copy)."""
    from safetensors.numpy import load_file

    return load_file(str(path))


def inline_weights(proto, tensors: dict[str, np.ndarray]):
    """The graph with its lifted weights back as initializers: a self-contained model (for tools
    that read one file, and for inspecting the program)."""
    from onnx import numpy_helper

    graph = proto.graph
    lifted = [i for i in graph.input if i.name.startswith(PREFIX)]
    for vi in lifted:
        graph.input.remove(vi)
        graph.initializer.append(numpy_helper.from_array(tensors[vi.name], vi.name))
    return proto


def load_graph(path: str | Path):
    """An exported graph file as one self-contained onnx.ModelProto."""
    import onnx

    from zotune.engines.onnx import program_of

    proto = onnx.load(str(path))
    weights = weights_path(program_of(path))
    return inline_weights(proto, load_weights(weights)) if weights.is_file() else proto


def bound_values(tensors: dict[str, np.ndarray]) -> dict:
    """key -> an ONNX Runtime value over the array's own memory (the arrays must outlive them)."""
    import onnxruntime as ort

    return {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in tensors.items()}
