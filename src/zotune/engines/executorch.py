"""The ExecuTorch engine: the training step exported as one .pte program.

`export_program` traces the same `PRGEStep` that eager training runs (fused noise: z for all layers
drawn in one hash call), lowers it with XNNPACK, and writes a program with four methods that share
one copy of the trained tensors (theta, N values):

    train_step(seed[1] i64, lr[1] f32, eps[1] f32, input_ids[b,T], attention_mask[b,T],
               position_ids[b,T], choice_ids[b,C], labels[b]) -> (loss [], g [q])
    forward(input_ids[be,T], attention_mask[be,T], position_ids[be,T], choice_ids[be,C])
               -> choice logits [be, C]      (with the current theta; be = eval batch size)
    get_lora() -> theta [N]
    set_lora(theta [N]) -> ()
    get_momentum() -> velocity [N], set_momentum(velocity [N]) -> ()   (only with momentum > 0:
               ZO-SGD heavy-ball, the momentum factor fixed at export)

Before anything is written the lowered program runs one step and one forward next to eager
PyTorch from the same theta; a difference above tolerance raises ExportCheckError and leaves no
file. A JSON sidecar (`<file>.json`) records the shapes, the adapter layout and the sha256 of the
.pte; `PteProgram.load` checks them, so a truncated, corrupted or mismatched program is refused
with a clear error instead of failing inside the runtime.

ExecuTorch traps handled here (DESIGN.md section 4): trained tensors must be buffers (not
parameters), methods share them only with MemoryPlanningPass(share_mutable_buffers=True) and
emit_mutable_buffer_names=True, their initial values are not serialised (PteProgram always sets
theta at load), and a delegate must never own them as constant data (methods that only read theta
would silently keep the export-time values).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import zotune
from zotune.engines._graph_passes import PASSES
from zotune.engines.et_lowering import (
    KeepStatePartitioner, attention_impl, cheap_provenance, portable_ops, quantize_8da4w,
)
from zotune.engines.export_common import (
    EXACT, FORMAT_VERSION, FP32, ChoiceForward, EngineError, ExportCheckError, ExportReport,
    ProgramFileError, check_batch, check_options, check_values, flat_trained, gate, layout,
    load_flat, parity_metrics, sha256_bytes, sidecar_path, trained_to_buffers, write_atomic,
)
from zotune.engines.pte import ENGINE, METHODS, ExecuTorchEngine, PteProgram
from zotune.estimators.prge import VELOCITY, PRGEStep

QUANTIZE = (None, "8da4w")
# Parity after one step, max abs differences (the metrics: _parity_check). An fp32 program must
# match eager in all of them. An 8da4w program is held to the torchao-quantized eager model in
# the forward logits and the loss at 5e-2 only: with 8-bit dynamic activations a last-bit
# difference upstream flips a rounding downstream, and the flips cascade through the layers (one
# quantized linear agrees to 1.5e-5; SmolLM2's 30 layers end 1.7e-2 apart in relative logits
# and 2.0e-2 in the loss). The loss differences behind g are of that size too, so g and theta
# after a step cannot be compared with eager's; what is checked exactly instead is that the
# program applies the update its own g implies ("update", "momentum").
TOLERANCE = {
    None: FP32,
    "8da4w": {**EXACT, "forward": 5e-2, "loss": 5e-2},
}


# ---------------------------------------------------------------------------------------------
# The exported methods: PRGEStep itself (train_step) and the three below. Each registers the
# model under the same attribute name ("model"), so a trained buffer has the same fully qualified
# name in every method: that is what share_mutable_buffers keys on.

_Forward = ChoiceForward


class _GetLora(nn.Module):
    def __init__(self, model, adapter):
        super().__init__()
        self.model, self.adapter = model, adapter

    def forward(self):
        return torch.cat([t.tensor.reshape(-1) for t in self.adapter.trained])


class _SetLora(nn.Module):
    def __init__(self, model, adapter):
        super().__init__()
        self.model, self.adapter = model, adapter

    @torch.no_grad()
    def forward(self, flat):
        for t in self.adapter.trained:
            t.tensor.copy_(flat[t.offset: t.offset + t.tensor.numel()].reshape(t.tensor.shape))


class _GetMomentum(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self):
        return getattr(self.model, VELOCITY).clone()


class _SetMomentum(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    @torch.no_grad()
    def forward(self, flat):
        getattr(self.model, VELOCITY).copy_(flat)


# ---------------------------------------------------------------------------------------------

def export_program(model: nn.Module, adapter, loss, q: int, b: int, seq_len: int, n_choices: int,
                   dual: bool = True, noise: str = "normal", quantize: str | None = None,
                   out_path: str | Path = "model.pte", *, eval_batch: int | None = None,
                   model_name: str | None = None, momentum: float = 0.0, xnnpack: bool = True,
                   group_size: int = 32,
                   tolerance: float | None = None, check_seed: int = 12345,
                   check_lr: float = 1e-3, check_eps: float = 1e-2,
                   attention: str | None = "eager", log=None) -> ExportReport:
    """Export the P-RGE training step of (model, adapter, loss) to one ExecuTorch program.

    The adapter's trained tensors become registered buffers of `model` (in place, values kept;
    eager use of model and adapter is unaffected). With quantize="8da4w" the export works on a
    deep copy, so the caller's model stays fp32. Raises ExportCheckError (and writes nothing) if
    the lowered program and eager PyTorch differ beyond TOLERANCE[quantize] (or `tolerance`, one
    value for every metric) in the forward logits (relative to max(1, |logits|)), the loss, the
    loss differences behind g (2 eps g), theta after one step, or the update the program's own g
    implies. With momentum > 0 the step keeps a heavy-ball buffer (the same update as
    eager ZO-SGD with that momentum) and the program gains get_momentum / set_momentum."""
    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    if quantize not in QUANTIZE:
        raise EngineError(f"quantize: expected one of {QUANTIZE}, got {quantize!r}")
    check_options(adapter, loss, q, b, seq_len, n_choices, noise, momentum, "ExecuTorch")
    eval_batch = eval_batch or b
    tol = (TOLERANCE[quantize] if tolerance is None
           else {k: float(tolerance) for k in TOLERANCE[quantize]})
    out_path = Path(out_path)
    dtype = adapter.trained[0].tensor.dtype

    trained_to_buffers(adapter)
    if quantize:
        # quantize_ rewrites modules in place: work on a copy so the caller's model stays fp32.
        model, adapter = copy.deepcopy((model, adapter))
        quantized = quantize_8da4w(model, adapter, group_size)
        say(f"8da4w: quantized {len(quantized)} linear layers (group size {group_size})")
    was_training = model.training
    model.eval()
    theta0 = flat_trained(adapter)
    lay = layout(adapter)
    state_fqns = [f"model.{t.name}" for t in adapter.trained]
    if momentum:
        state_fqns.append(f"model.{VELOCITY}")

    vocab = model.get_input_embeddings().weight.shape[0]
    batch = check_batch(vocab, b, seq_len, n_choices, seed=check_seed)
    eval_in = check_batch(vocab, eval_batch, seq_len, n_choices, seed=check_seed + 1)[:4]
    seed_t = torch.tensor([check_seed], dtype=torch.int64)
    lr_t = torch.tensor([check_lr], dtype=torch.float32)
    eps_t = torch.tensor([check_eps], dtype=torch.float32)

    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, \
        to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    step = PRGEStep(model, adapter, loss, q, dual=dual, noise=noise, momentum=momentum,
                    fused_noise=True)  # registers the model's VELOCITY buffer when momentum > 0
    modules = {
        "train_step": (step, (seed_t, lr_t, eps_t, *batch)),
        "forward": (_Forward(model, adapter, loss), eval_in),
        "get_lora": (_GetLora(model, adapter), ()),
        "set_lora": (_SetLora(model, adapter), (theta0.clone(),)),
    }
    if momentum:
        modules["get_momentum"] = (_GetMomentum(model), ())
        modules["set_momentum"] = (_SetMomentum(model), (torch.zeros_like(theta0),))
    methods = list(modules)
    seconds = {}
    try:
        t0 = time.perf_counter()
        programs = {}
        # MATH sdpa while tracing: the fused CPU kernel reports transposed output strides, so the
        # model's .contiguous() after attention is traced away and the views after it break once
        # to_edge decomposes sdpa (with different strides).
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), attention_impl(model, attention):
            for name, (mod, args) in modules.items():
                programs[name] = torch.export.export(mod, tuple(args), strict=False)
        seconds["export"] = time.perf_counter() - t0
        say(f"torch.export: {seconds['export']:.1f} s")

        t0 = time.perf_counter()
        partitioners = {name: [] for name in methods}
        if xnnpack:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import \
                XnnpackPartitioner
            for name in ("train_step", "forward"):
                partitioners[name] = [KeepStatePartitioner(XnnpackPartitioner(), state_fqns)]
        with sdpa_kernel([SDPBackend.MATH]), cheap_provenance():  # same sdpa strides as traced
            edge = to_edge_transform_and_lower(
                programs, partitioner=partitioners,
                transform_passes=list(PASSES) if xnnpack else None,
                compile_config=EdgeCompileConfig(_check_ir_validity=False))
        seconds["lower"] = time.perf_counter() - t0
        mutated = set(edge.exported_program("train_step").graph_signature.buffers_to_mutate
                      .values())
        missing = [f for f in state_fqns if f not in mutated]
        if missing:
            raise EngineError(f"train_step does not update {len(missing)} trained tensors "
                              f"(e.g. {missing[0]}) after lowering")
        portable = {name: portable_ops(edge.exported_program(name)) for name in methods}
        say(f"to_edge + lowering: {seconds['lower']:.1f} s; non-delegated ops {portable}")

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # "initial values of mutated buffers are not serialised": expected, PteProgram
            # always sets theta when it loads a program.
            warnings.filterwarnings("ignore", message="Mutation on a buffer")
            et = edge.to_executorch(ExecutorchBackendConfig(
                memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
                emit_mutable_buffer_names=True))
        data = et.buffer
        del edge, et, programs
        seconds["emit"] = time.perf_counter() - t0
        say(f"to_executorch: {seconds['emit']:.1f} s, {len(data) / 2**20:.1f} MiB")

        # Parity: the lowered program against eager PyTorch, from the same (nonzero) theta.
        t0 = time.perf_counter()
        theta_c, velocity_c = check_values(theta0, momentum, check_seed)
        check = _parity_check(data, step, adapter, loss, model, theta_c, velocity_c, seed_t,
                              lr_t, eps_t, batch, eval_in)
        seconds["check"] = time.perf_counter() - t0
    finally:
        load_flat(adapter, theta0)  # the eager check moved theta: give the caller its own back
        model._buffers.pop(VELOCITY, None)
        model.train(was_training)
    say(f"parity vs eager: {check}")
    gate(check, tol, "lowered ExecuTorch program", out_path)

    meta = {
        "format": FORMAT_VERSION, "engine": ENGINE, "methods": methods,
        "q": int(q), "b": int(b), "seq_len": int(seq_len), "n_choices": int(n_choices),
        "eval_batch": int(eval_batch), "numel": int(adapter.numel), "noise": noise,
        "dual": bool(dual), "momentum": float(momentum), "quantize": quantize,
        "group_size": group_size if quantize else None,
        "xnnpack": bool(xnnpack), "loss": loss.kind, "dtype": str(dtype).replace("torch.", ""),
        "model": (model_name or getattr(model.config, "_name_or_path", "")
                  or model.config.model_type),
        "model_type": model.config.model_type, "layout": lay,
        "init": "zeros" if not theta0.any() else "given",
        "zotune": zotune.__version__, "torch": torch.__version__, "executorch": _et_version(),
        "check": check, "tolerance": tol,
        "size": len(data), "sha256": sha256_bytes(data),
    }
    write_atomic(out_path, data)
    write_atomic(sidecar_path(out_path), json.dumps(meta, indent=1))
    seconds["total"] = time.perf_counter() - t_start
    return ExportReport(str(out_path), str(sidecar_path(out_path)), len(data), meta["sha256"],
                        seconds, check, tol, portable, meta)


def _et_version() -> str:
    try:
        from importlib.metadata import version
        return version("executorch")
    except Exception:  # noqa: BLE001 - only informative
        return "unknown"


@torch.no_grad()
def _parity_check(data: bytes, step, adapter, loss, model, theta, velocity, seed_t, lr_t, eps_t,
                  batch, eval_in) -> dict:
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(data)
    methods = {name: program.load_method(name) for name in program.method_names}  # all first
    methods["set_lora"].execute([theta.clone()])
    if velocity is not None:
        methods["set_momentum"].execute([velocity.clone()])
    got = {"get": methods["get_lora"].execute([])[0],
           "logits": methods["forward"].execute(list(eval_in))[0]}
    got["loss"], got["g"] = methods["train_step"].execute([seed_t, lr_t, eps_t, *batch])
    got["theta"] = methods["get_lora"].execute([])[0]
    if velocity is not None:
        got["velocity"] = methods["get_momentum"].execute([])[0]
    return parity_metrics(got, step, adapter, loss, model, theta, velocity, seed_t, lr_t, eps_t,
                          batch, eval_in)


__all__ = ["export_program", "ExportReport", "PteProgram", "ExecuTorchEngine", "ENGINE",
           "METHODS", "TOLERANCE", "EngineError", "ExportCheckError", "ProgramFileError"]
