"""The ExecuTorch engine: the training step exported as one .pte program.

`export_program` traces the same `PRGEStep` that eager training runs (fused noise: z for all layers
drawn in one hash call), lowers it with XNNPACK, and writes a program with four methods that share
one copy of the trained tensors (theta, N values); the batch is the loss's tensors
(signature.py: classification, multiple choice, or the completion tokens of generation and chat):

    train_step(seed[1] i64, lr[1] f32, eps[1] f32, *batch) -> (loss [], g [q])
    forward(*batch without labels) -> choice logits [be, C] (classification), choice scores
               [be, C] (choice), or nll sum and token count [be] (generation), with the
               current theta; be = eval batch size
    get_lora() -> theta [N]
    set_lora(theta [N]) -> ()
    get_momentum() -> velocity [N], set_momentum(velocity [N]) -> ()   (only with momentum > 0:
               ZO-SGD heavy-ball, the momentum factor fixed at export)

Before anything is written the lowered program runs one step and one forward next to eager
PyTorch from the same theta; a difference above tolerance raises ExportCheckError and leaves no
file. A JSON sidecar (`<file>.json`) records the shapes, the adapter layout and the sha256 of the
.pte; `PteProgram.load` checks them, so a truncated, corrupted or mismatched program is refused
with a clear error instead of failing inside the runtime.

ExecuTorch traps handled here (docs/engines.md): trained tensors must be buffers (not
parameters), methods share them only with MemoryPlanningPass(share_mutable_buffers=True) and
emit_mutable_buffer_names=True, their initial values are not serialised (PteProgram always sets
theta at load), and a delegate must never own them as constant data (methods that only read theta
would silently keep the export-time values).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from zotune.adapters.theta import set_theta, theta_of
from zotune.engines._graph_passes import PASSES
from zotune.engines.et_lowering import (
    KeepStatePartitioner,
    attention_impl,
    cheap_provenance,
    portable_ops,
    quantize_8da4w,
)
from zotune.engines.et_parity import TOLERANCE, parity_check
from zotune.engines.export_common import (
    FORMAT_VERSION,
    EngineError,
    EvalForward,
    ExportCheckError,
    ExportReport,
    ProgramFileError,
    StepSpec,
    check_options,
    length_dims,
    sha256_bytes,
    sidecar_path,
    trained_to_buffers,
)
from zotune.engines.parity import gate
from zotune.engines.pte import ENGINE, METHODS, ExecuTorchEngine, PteProgram
from zotune.estimators.prge import VELOCITY
from zotune.io import atomic_write_bytes, atomic_write_text

QUANTIZE = (None, "8da4w")


# ---------------------------------------------------------------------------------------------
# The exported methods: PRGEStep itself (train_step) and the three below. Each registers the
# model under the same attribute name ("model"), so a trained buffer has the same fully qualified
# name in every method: that is what share_mutable_buffers keys on.

_Forward = EvalForward  # the evaluation method, shared with the ONNX exporter


class _GetLora(nn.Module):
    def __init__(self, model, adapter):
        super().__init__()
        self.model, self.adapter = model, adapter

    def forward(self):
        return self.adapter.layout.gather(self.adapter.tensors())


class _SetLora(nn.Module):
    def __init__(self, model, adapter):
        super().__init__()
        self.model, self.adapter = model, adapter

    @torch.no_grad()
    def forward(self, flat):
        self.adapter.layout.scatter(flat, self.adapter.tensors())


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


def export_program(
    model: nn.Module,
    adapter,
    loss,
    spec: StepSpec,
    out_path: str | Path = "model.pte",
    *,
    xnnpack: bool = True,
    group_size: int = 32,
    attention: str | None = "eager",
    dynamic_length: bool = False,
    log=None,
) -> ExportReport:
    """Export the P-RGE training step of (model, adapter, loss) to one ExecuTorch program.

    The adapter's trained tensors become registered buffers of `model` (in place, values kept;
    eager use of model and adapter is unaffected). The loss's kind decides the batch
    (signature.py) of the shapes `spec` gives. With spec.quantize
    "8da4w" the export works on a deep copy, so the caller's model stays fp32. Raises ExportCheckError
    (and writes nothing) if the lowered program and eager PyTorch differ beyond
    TOLERANCE[quantize] (or spec.tolerance, one value for every metric) in the forward outputs
    (relative to max(1, |outputs|)), the loss, the loss differences behind g (2 eps g), theta
    after one step, or the update the program's own g implies. With momentum > 0 the step keeps
    a heavy-ball buffer (the same update as eager ZO-SGD with that momentum) and the program
    gains get_momentum / set_momentum.

    Stages: check the options, build the methods, trace, lower, emit, check parity against
    eager, write the program and its metadata."""
    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    sig = check_options(adapter, loss, spec, "ExecuTorch", QUANTIZE)
    quantize = spec.quantize
    tol = spec.tolerances(TOLERANCE[quantize])
    out_path = Path(out_path)
    dtype = adapter.tensors()[0].dtype

    trained_to_buffers(adapter)
    if quantize:
        # quantize_ rewrites modules in place: work on a copy so the caller's model stays fp32.
        model, adapter = copy.deepcopy((model, adapter))
        quantized = quantize_8da4w(model, adapter, group_size)
        say(f"8da4w: quantized {len(quantized)} linear layers (group size {group_size})")
    was_training = model.training
    model.eval()
    theta0 = theta_of(adapter)
    plan = _Plan(model, adapter, loss, spec, sig, dynamic_length)
    seconds = {}
    try:
        with _timed(seconds, "export"):
            programs = _trace(plan, attention)
        say(f"torch.export: {seconds['export']:.1f} s")
        with _timed(seconds, "lower"):
            edge = _lower(plan, programs, xnnpack)
        portable = {name: portable_ops(edge.exported_program(name)) for name in plan.methods}
        say(f"to_edge + lowering: {seconds['lower']:.1f} s; non-delegated ops {portable}")
        with _timed(seconds, "emit"):
            data = _emit(edge, plan.dynamic)
        del edge, programs
        say(f"to_executorch: {seconds['emit']:.1f} s, {len(data) / 2**20:.1f} MiB")
        with _timed(seconds, "check"):
            check = parity_check(data, plan, theta0, dtype)
    finally:
        set_theta(adapter, theta0)  # the eager check moved theta: give the caller its own back
        model._buffers.pop(VELOCITY, None)
        model.train(was_training)
    say(f"parity vs eager: {check}")
    gate(check, tol, "lowered ExecuTorch program", out_path)

    meta = _metadata(plan, data, theta0, group_size, xnnpack, check, tol)
    atomic_write_bytes(out_path, data)
    atomic_write_text(sidecar_path(out_path), json.dumps(meta, indent=1))
    seconds["total"] = time.perf_counter() - t_start
    return ExportReport(
        str(out_path),
        str(sidecar_path(out_path)),
        len(data),
        meta["sha256"],
        seconds,
        check,
        tol,
        portable,
        meta,
    )


# -- the stages of export_program ----------------------------------------------------------------


class _Plan:
    """The methods to export, with the example inputs they are traced and checked with."""

    def __init__(self, model, adapter, loss, spec: StepSpec, sig, dynamic_length: bool = False):
        self.model, self.adapter, self.loss = model, adapter, loss
        self.spec, self.sig = spec, sig
        # The buffers every method shares: what no delegate may own, and what train_step updates.
        self.state_fqns = [f"model.{name}" for name in adapter.layout.names]
        if spec.momentum:
            self.state_fqns.append(f"model.{VELOCITY}")
        vocab = model.get_input_embeddings().weight.shape[0]
        self.batch, self.eval_in = spec.check_inputs(sig, vocab)
        self.cases = [(self.batch, self.eval_in)]
        self.shapes = {}
        self.dynamic = dynamic_length and spec.seq_len > sig.min_length
        if self.dynamic:  # one symbolic length T <= seq_len; checked at full and half length
            rest = length_dims(sig, spec.seq_len, hint=True)
            self.shapes = {"train_step": (None, None, None, rest), "forward": (rest[: len(self.eval_in)],)}
            self.cases.append(spec.check_inputs(sig, vocab, max(sig.min_length, spec.seq_len // 2), case=1))
        self.seed_t, self.lr_t, self.eps_t = spec.scalars()
        self.step = spec.step(model, adapter, loss)
        theta = torch.zeros(adapter.numel, dtype=adapter.tensors()[0].dtype)
        self.modules = {
            "train_step": (self.step, (self.seed_t, self.lr_t, self.eps_t, *self.batch)),
            "forward": (_Forward(model, adapter, loss), self.eval_in),
            "get_lora": (_GetLora(model, adapter), ()),
            "set_lora": (_SetLora(model, adapter), (theta,)),
        }
        if spec.momentum:
            self.modules["get_momentum"] = (_GetMomentum(model), ())
            self.modules["set_momentum"] = (_SetMomentum(model), (torch.zeros_like(theta),))
        self.methods = list(self.modules)


@contextlib.contextmanager
def _timed(seconds: dict, stage: str):
    t0 = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - t0


def _trace(plan: _Plan, attention) -> dict:
    """torch.export of every method."""
    # MATH sdpa while tracing: the fused CPU kernel reports transposed output strides, so the
    # model's .contiguous() after attention is traced away and the views after it break once
    # to_edge decomposes sdpa (with different strides).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    programs = {}
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), attention_impl(plan.model, attention):
        for name, (mod, args) in plan.modules.items():
            shapes = plan.shapes.get(name)
            programs[name] = torch.export.export(mod, tuple(args), dynamic_shapes=shapes, strict=False)
    return programs


def _lower(plan: _Plan, programs: dict, xnnpack: bool):
    """to_edge with XNNPACK delegation of train_step and forward (never of the shared state)."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from torch.nn.attention import SDPBackend, sdpa_kernel

    partitioners = {name: [] for name in plan.methods}
    if xnnpack:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        for name in ("train_step", "forward"):
            partitioners[name] = [KeepStatePartitioner(XnnpackPartitioner(), plan.state_fqns)]
    with sdpa_kernel([SDPBackend.MATH]), cheap_provenance():  # same sdpa strides as traced
        edge = to_edge_transform_and_lower(
            programs,
            partitioner=partitioners,
            transform_passes=list(PASSES) if xnnpack else None,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
    # torch.export records the buffer mutations only after decomposition: check them here.
    mutated = set(edge.exported_program("train_step").graph_signature.buffers_to_mutate.values())
    missing = [f for f in plan.state_fqns if f not in mutated]
    if missing:
        raise EngineError(
            f"train_step does not update {len(missing)} trained tensors (e.g. {missing[0]}) after lowering"
        )
    return edge


def _emit(edge, dynamic: bool = False) -> bytes:
    """The .pte bytes, with one copy of the mutable state shared by all methods."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass

    with warnings.catch_warnings():
        # "initial values of mutated buffers are not serialised": expected, PteProgram
        # always sets theta when it loads a program.
        warnings.filterwarnings("ignore", message="Mutation on a buffer")
        et = edge.to_executorch(
            ExecutorchBackendConfig(
                memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
                emit_mutable_buffer_names=True,
                # A view of a symbolic length must stay a kernel: the emitter has no sym ints.
                remove_view_copy=not dynamic,
            )
        )
    return et.buffer


def _metadata(plan: _Plan, data: bytes, theta0, group_size, xnnpack, check, tol) -> dict:
    """The sidecar: shapes, options, theta's layout, versions, the check and the file's hash."""
    return {
        "format": FORMAT_VERSION,
        "engine": ENGINE,
        "methods": plan.methods,
        **plan.spec.meta(plan.sig, plan.model, plan.adapter, plan.loss, theta0),
        "group_size": group_size if plan.spec.quantize else None,
        "dynamic_length": plan.dynamic,
        "xnnpack": bool(xnnpack),
        "executorch": _et_version(),
        "check": check,
        "tolerance": tol,
        "size": len(data),
        "sha256": sha256_bytes(data),
    }


def _et_version() -> str:
    try:
        from importlib.metadata import version

        return version("executorch")
    except Exception:  # noqa: BLE001 - only informative
        return "unknown"


__all__ = [
    "export_program",
    "ExportReport",
    "PteProgram",
    "ExecuTorchEngine",
    "ENGINE",
    "METHODS",
    "TOLERANCE",
    "EngineError",
    "ExportCheckError",
    "ProgramFileError",
]
