"""Lowering helpers for the ExecuTorch exporter: 8da4w quantisation of the frozen base, a
partitioner guard that keeps theta out of delegates, and two tracing workarounds."""

from __future__ import annotations

import torch
import torch.nn as nn


def base_linears(model: nn.Module, group_size: int) -> list[str]:
    """The frozen base linears a 4-bit recipe quantizes: the decoder's nn.Linear modules whose
    input width the group size divides; not the embedding / LM head (whose rows score the label
    words). LoRA A/B are plain tensors of LoRALinear, never nn.Linear modules."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = {id(m.weight) for m in (head, emb) if m is not None}
    return [
        fqn
        for fqn, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not head
        and id(module.weight) not in tied
        and module.in_features % group_size == 0
    ]


def quantize_8da4w(model: nn.Module, adapter, group_size: int) -> list[str]:
    """torchao 8da4w (int8 dynamic activations, int4 grouped weights) on `base_linears`."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    chosen = base_linears(model, group_size)
    quantize_(
        model,
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)
        ),
        filter_fn=lambda module, fqn: fqn in chosen,
    )
    bf16_scales(model, chosen)
    return chosen


def bf16_scales(model: nn.Module, fqns: list[str]) -> None:
    """XNNPACK's blockwise int4 GEMM keeps the group scales in bfloat16. Rounding them here makes
    the eager quantized model compute what the lowered program computes (one linear: 5e-2 ->
    1.5e-5 max difference on outputs of 20), so the parity check compares arithmetic, not scale
    storage. The lowered program is unchanged (bf16 of a bf16-exact value)."""
    modules = dict(model.named_modules())
    for fqn in fqns:
        scale = modules[fqn].weight.scale
        scale.copy_(scale.to(torch.bfloat16).to(scale.dtype))


class KeepStatePartitioner:
    """Wraps a partitioner so that no delegate takes ownership of the trained buffers: a method
    that only reads theta (forward, get_lora) would otherwise have the export-time values baked
    into the delegate as constant data, and never see later updates."""

    def __new__(cls, inner, state_fqns):
        from executorch.exir.backend.partitioner import Partitioner

        class KeepState(Partitioner):
            def __init__(self):
                super().__init__(inner.spec)
                self.inner, self.fqns = inner, set(state_fqns)

            def partition(self, exported_program):
                res = self.inner.partition(exported_program)
                ep = res.tagged_exported_program
                buffers = ep.graph_signature.inputs_to_buffers
                for node in ep.graph.nodes:
                    if node.op == "placeholder" and buffers.get(node.name) in self.fqns:
                        node.meta.pop("delegation_tag", None)
                return res

            def ops_to_not_decompose(self, ep):
                return self.inner.ops_to_not_decompose(ep)

        return KeepState()


class attention_impl:
    """Trace with the model's "eager" attention (matmul, additive mask, softmax): all of it
    delegates to XNNPACK, whereas sdpa decomposes into boolean-mask handling and scalings that
    do not, which splits every layer into more partitions (each compiled separately).
    The eager reference of the parity check runs in the caller's configuration."""

    def __init__(self, model, impl):
        self.config, self.impl = model.config, impl

    def __enter__(self):
        self.saved = self.config._attn_implementation
        if self.impl:
            self.config._attn_implementation = self.impl

    def __exit__(self, *exc):
        self.config._attn_implementation = self.saved


class cheap_provenance:
    """torch.fx records for every node created by a pass where it came from (NodeSource), and
    each record deep-copies the whole history of the node it replaces. The history grows by one
    level per pass, and to_edge plus the XNNPACK passes run dozens of them, so on a full decoder
    those copies dominated lowering time. Share the (never mutated) history instead of copying
    it while lowering; the records keep the same content."""

    def __enter__(self):
        import inspect

        import torch.fx.traceback as tb

        self.cls = getattr(tb, "NodeSource", None)
        self.saved = getattr(self.cls, "__init__", None)
        params = list(inspect.signature(self.saved).parameters) if self.saved else []
        if params != ["self", "node", "pass_name", "action"]:
            self.cls = None  # another torch: leave it alone
            return
        original = self.saved

        def init(this, node, pass_name="", action=None):
            if node is None or "from_node" not in node.meta:
                return original(this, node, pass_name, action)
            history = node.meta.pop("from_node")
            try:
                original(this, node, pass_name, action)
            finally:
                node.meta["from_node"] = history
            this.from_node = list(history)

        self.cls.__init__ = init

    def __exit__(self, *exc):
        if self.cls is not None:
            self.cls.__init__ = self.saved


def portable_ops(ep) -> int:
    n = 0
    for node in ep.graph.nodes:
        if (
            node.op == "call_function"
            and "getitem" not in str(node.target)
            and "executorch_call_delegate" not in str(node.target)
        ):
            n += 1
    return n
