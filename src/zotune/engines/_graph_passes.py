"""Edge-dialect rewrites that keep transformer blocks inside one XNNPACK partition.

Every op XNNPACK does not take splits the graph: the op runs on a portable kernel and each
delegated piece is compiled separately (lowering cost grows with the number of pieces). Two
patterns of decoder blocks split it on every layer and have exact 4-D equivalents XNNPACK takes:

- RMSNorm's mean over the last dim of a [B, T, D] tensor (XNNPACK's mean only averages the two
  innermost dims of a 4-D tensor): view as [B, T, D, 1], mean over (2, 3), view back.
- repeat_kv's unsqueeze + expand of K/V heads (XNNPACK has no expand): concatenate copies.
- expands to the same shape (left by matmul's decomposition): dropped.
"""

from __future__ import annotations

import math

import torch


def _ops():
    from executorch.exir.dialects._ops import ops as exir_ops

    return exir_ops.edge.aten


def _copy_meta(src, dst):
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "torch_fn"):
        if key in src.meta:
            dst.meta.setdefault(key, src.meta[key])


def _static(*vals) -> bool:
    """Every shape concrete: a rewrite writes shapes as literal int lists, and a symbolic size
    there has no graph node the ExecuTorch emitter could read it from."""
    return all(not isinstance(d, torch.SymInt) for v in vals for d in v.shape)


def _rewrite_calls(gm: torch.fx.GraphModule, target, rewrite):
    """The skeleton of every rewrite here. For each call of `target`, rewrite(emit, node) returns
    the node that replaces it, or None to leave it. emit(op, args, val) adds a call before the
    node, with `val` as its meta value and the node's provenance. The replaced node is erased,
    and so are its inputs that nothing else uses any more."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != target:
            continue

        def emit(op, args, val, node=node):
            new = gm.graph.call_function(op, args)
            new.meta["val"] = val
            _copy_meta(node, new)
            return new

        with gm.graph.inserting_before(node):
            out = rewrite(emit, node)
        if out is None:
            continue
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        for a in inputs:
            if a.op == "call_function" and not a.users:
                gm.graph.erase_node(a)
        changed = True
    from torch.fx.passes.infra.pass_base import PassResult

    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


def mean_last_dim_to_4d(gm: torch.fx.GraphModule):
    aten = _ops()

    def rewrite(emit, node):
        x = node.args[0]
        val = x.meta.get("val")
        if val is None or val.dim() != 3 or node.kwargs.get("dtype") is not None or not _static(val):
            return None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or [d % 3 for d in dims] != [2]:
            return None
        b, t, d = val.shape
        v4 = emit(aten.view_copy.default, (x, [b, t, d, 1]), val.reshape(b, t, d, 1))
        m4 = emit(aten.mean.dim, (v4, [2, 3], True), v4.meta["val"].mean([2, 3], True))
        shape = [b, t, 1] if keep else [b, t]
        return emit(aten.view_copy.default, (m4, shape), m4.meta["val"].reshape(shape))

    return _rewrite_calls(gm, aten.mean.dim, rewrite)


def expand_to_cat(gm: torch.fx.GraphModule):
    """expand_copy(unsqueeze_copy(x, d), sizes) that repeats the new dim n times (2 <= n <= 5)
    -> view_copy(cat([view_copy(x, x.shape[:d] + [1, rest])] * n, d), sizes)."""
    aten = _ops()

    def rewrite(emit, node):
        u = node.args[0]
        if not (
            isinstance(u, torch.fx.Node)
            and u.op == "call_function"
            and u.target == aten.unsqueeze_copy.default
        ):
            return None
        x = u.args[0]
        xv, uv, ov = x.meta.get("val"), u.meta.get("val"), node.meta.get("val")
        if xv is None or uv is None or ov is None or not _static(xv, ov):
            return None
        d = u.args[1] % uv.dim()
        diff = [i for i in range(uv.dim()) if uv.shape[i] != ov.shape[i]]
        n = int(ov.shape[d])
        if diff != [d] or not 2 <= n <= 5 or d > 2:
            return None
        flat = list(xv.shape[:d]) + [1, math.prod(xv.shape[d:])]
        # n distinct view nodes: XNNPACK's cat counts distinct inputs and needs at least two
        vs = [emit(aten.view_copy.default, (x, flat), xv.reshape(flat)) for _ in range(n)]
        c = emit(aten.cat.default, (vs, d), torch.cat([v.meta["val"] for v in vs], d))
        return emit(aten.view_copy.default, (c, list(ov.shape)), c.meta["val"].reshape(ov.shape))

    return _rewrite_calls(gm, aten.expand_copy.default, rewrite)


def remove_noop_expand(gm: torch.fx.GraphModule):
    """expand_copy to the shape its input already has (matmul's decomposition leaves these)."""

    def rewrite(emit, node):
        x = node.args[0]
        xv, ov = x.meta.get("val"), node.meta.get("val")
        if xv is None or ov is None or tuple(xv.shape) != tuple(ov.shape) or xv.dtype != ov.dtype:
            return None
        return x

    return _rewrite_calls(gm, _ops().expand_copy.default, rewrite)


def strip_provenance(gm: torch.fx.GraphModule):
    """Drop node provenance (from_node, stack_trace). Every backend pass deep-copies each node's
    meta, and the provenance chain grows with every pass: on a whole decoder this dominated the
    XNNPACK lowering time."""
    for node in gm.graph.nodes:
        node.meta.pop("from_node", None)
        node.meta.pop("stack_trace", None)
    from torch.fx.passes.infra.pass_base import PassResult

    return PassResult(gm, False)


PASSES = [mean_last_dim_to_4d, expand_to_cat, remove_noop_expand, strip_provenance]
