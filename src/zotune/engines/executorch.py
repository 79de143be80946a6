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

import zotune
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
    check_options,
    sha256_bytes,
    sidecar_path,
    trained_to_buffers,
)
from zotune.engines.parity import gate
from zotune.engines.pte import ENGINE, METHODS, ExecuTorchEngine, PteProgram
from zotune.estimators.prge import VELOCITY, PRGEStep
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
    q: int,
    b: int,
    seq_len: int,
    n_choices: int,
    dual: bool = True,
    noise: str = "normal",
    quantize: str | None = None,
    out_path: str | Path = "model.pte",
    *,
    eval_batch: int | None = None,
    n_target: int = 0,
    model_name: str | None = None,
    momentum: float = 0.0,
    xnnpack: bool = True,
    group_size: int = 32,
    tolerance: float | None = None,
    check_seed: int = 12345,
    check_lr: float = 1e-3,
    check_eps: float = 1e-2,
    attention: str | None = "eager",
    log=None,
) -> ExportReport:
    """Export the P-RGE training step of (model, adapter, loss) to one ExecuTorch program.

    The adapter's trained tensors become registered buffers of `model` (in place, values kept;
    eager use of model and adapter is unaffected). The loss's kind decides the batch
    (signature.py): n_choices is C (label words, or the most choices of an example), n_target
    is L (the target positions of the choice and generation losses). With quantize="8da4w"
    the export works on a deep copy, so the caller's model stays fp32. Raises ExportCheckError
    (and writes nothing) if the lowered program and eager PyTorch differ beyond
    TOLERANCE[quantize] (or `tolerance`, one value for every metric) in the forward outputs
    (relative to max(1, |outputs|)), the loss, the loss differences behind g (2 eps g), theta
    after one step, or the update the program's own g implies. With momentum > 0 the step keeps
    a heavy-ball buffer (the same update as eager ZO-SGD with that momentum) and the program
    gains get_momentum / set_momentum.

    Stages: check the options, build the methods, trace, lower, emit, check parity against
    eager, write the program and its metadata."""
    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    sig = _check_options(adapter, loss, quantize, noise, momentum, q, b, seq_len, n_choices, n_target)
    tol = TOLERANCE[quantize] if tolerance is None else {k: float(tolerance) for k in TOLERANCE[quantize]}
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
    opts = dict(q=q, b=b, seq_len=seq_len, sig=sig, eval_batch=eval_batch or b)
    opts.update(dual=dual, noise=noise, momentum=momentum, check=(check_seed, check_lr, check_eps))
    plan = _Plan(model, adapter, loss, **opts)
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
            data = _emit(edge)
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

    meta = _metadata(plan, data, dtype, theta0, quantize, group_size, xnnpack, model_name, check, tol)
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


def _check_options(adapter, loss, quantize, noise, momentum, q, b, seq_len, n_choices, n_target):
    if quantize not in QUANTIZE:
        raise EngineError(f"quantize: expected one of {QUANTIZE}, got {quantize!r}")
    return check_options(adapter, loss, q, b, seq_len, n_choices, n_target, noise, momentum, "ExecuTorch")


class _Plan:
    """The methods to export, with the example inputs they are traced and checked with."""

    def __init__(self, model, adapter, loss, *, q, b, seq_len, sig, eval_batch, dual, noise, momentum, check):
        check_seed, check_lr, check_eps = check
        self.model, self.adapter, self.loss = model, adapter, loss
        self.q, self.b, self.seq_len, self.sig = q, b, seq_len, sig
        self.eval_batch, self.dual, self.noise, self.momentum = eval_batch, dual, noise, momentum
        self.check_seed = check_seed
        # The buffers every method shares: what no delegate may own, and what train_step updates.
        self.state_fqns = [f"model.{name}" for name in adapter.layout.names]
        if momentum:
            self.state_fqns.append(f"model.{VELOCITY}")
        vocab = model.get_input_embeddings().weight.shape[0]
        self.batch = sig.check_batch(vocab, b, seq_len, seed=check_seed)
        n_eval = len(sig.forward_inputs)
        self.eval_in = sig.check_batch(vocab, eval_batch, seq_len, seed=check_seed + 1)[:n_eval]
        self.seed_t = torch.tensor([check_seed], dtype=torch.int64)
        self.lr_t = torch.tensor([check_lr], dtype=torch.float32)
        self.eps_t = torch.tensor([check_eps], dtype=torch.float32)
        self.step = PRGEStep(
            model, adapter, loss, q, dual=dual, noise=noise, momentum=momentum, fused_noise=True
        )  # registers the model's VELOCITY buffer
        theta = torch.zeros(adapter.numel, dtype=adapter.tensors()[0].dtype)
        self.modules = {
            "train_step": (self.step, (self.seed_t, self.lr_t, self.eps_t, *self.batch)),
            "forward": (_Forward(model, adapter, loss), self.eval_in),
            "get_lora": (_GetLora(model, adapter), ()),
            "set_lora": (_SetLora(model, adapter), (theta,)),
        }
        if momentum:
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
            programs[name] = torch.export.export(mod, tuple(args), strict=False)
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


def _emit(edge) -> bytes:
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
            )
        )
    return et.buffer


def _metadata(
    plan: _Plan, data: bytes, dtype, theta0, quantize, group_size, xnnpack, model_name, check, tol
) -> dict:
    """The sidecar: shapes, options, theta's layout, versions, the check and the file's hash."""
    model = plan.model
    return {
        "format": FORMAT_VERSION,
        "engine": ENGINE,
        "methods": plan.methods,
        "q": int(plan.q),
        "b": int(plan.b),
        "seq_len": int(plan.seq_len),
        "n_choices": int(plan.sig.n_choices),
        "n_target": int(plan.sig.n_target),
        "eval_batch": int(plan.eval_batch),
        "numel": int(plan.adapter.numel),
        "noise": plan.noise,
        "dual": bool(plan.dual),
        "momentum": float(plan.momentum),
        "quantize": quantize,
        "group_size": group_size if quantize else None,
        "xnnpack": bool(xnnpack),
        "loss": plan.loss.kind,
        "dtype": str(dtype).replace("torch.", ""),
        "model": (model_name or getattr(model.config, "_name_or_path", "") or model.config.model_type),
        "model_type": model.config.model_type,
        "layout": plan.adapter.layout.to_json(),
        "init": "zeros" if not theta0.any() else "given",
        "zotune": zotune.__version__,
        "torch": torch.__version__,
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
