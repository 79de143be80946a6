"""The ONNX Runtime engine: the training step exported as a stateless ONNX program.

`export_program` exports the same `PRGEStep` that eager training runs (fused noise: z for all
layers drawn in one hash call) with `torch.onnx.export(dynamo=True)`, opset 20. ONNX graphs have
no mutable state, so theta [N] (and the momentum buffer [N]) are inputs and their new values
outputs; the host keeps them inside ONNX Runtime between steps (engines/ort.py). Two files:

    <out>            step(theta[N] f32, [velocity[N] f32,] seed[1] i64, lr[1] f32, eps[1] f32,
                          *batch) -> (new_theta[N], [new_velocity[N],] loss[], g[q])
    <out>.eval.onnx  forward(theta[N], *batch without labels) -> logits [be, C] (classification
                             logits or choice scores), or nll [be], count [be] (generation)
    <out>.weights.safetensors  the base weights both graphs take as inputs, each tensor once
                               (onnx_weights.py: one copy in memory for both graphs)

The batch is the loss's tensors (signature.py: classification, multiple choice, or the completion
tokens of generation and chat), with one symbolic length T (at least L + 1 with L target
positions) unless dynamic_length is off.

With spec.quantize "int4" the frozen base linears of both graphs become ONNX Runtime `MatMulNBits`
(4-bit weight blocks, float activations; onnx_int4.py); theta, LoRA's A and the LM head stay
fp32. Before anything is written both graphs run in ONNX Runtime next to eager PyTorch from the
same (nonzero) theta; a difference above tolerance raises ExportCheckError and leaves no file.
For int4 the eager reference computes with the weights ONNX Runtime dequantizes from its blocks,
so the check compares arithmetic, not quantization error. The JSON sidecar (`<out>.json`) has the
format the ExecuTorch engine writes (engine, shapes, layout, sha256 of both files).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from zotune import rng
from zotune.adapters.theta import set_theta, theta_of
from zotune.engines.export_common import (
    FORMAT_VERSION,
    EngineError,
    EvalForward,
    ExportReport,
    StepSpec,
    _owner,
    check_options,
    length_dims,
    sha256_bytes,
    sidecar_path,
    trained_to_buffers,
)
from zotune.engines.onnx_weights import lift_weights, save_weights, weights_path
from zotune.engines.parity import EXACT, FP32, check_values, gate, parity_metrics
from zotune.engines.signature import Signature
from zotune.estimators.prge import VELOCITY, PRGEStep
from zotune.io import atomic_write_bytes, atomic_write_text

ENGINE = "onnx"
OPSET = 20
# int4: symmetric 4-bit blocks (one scale each); int4-zp: a scale and a 4-bit zero point each;
# int4-hqq: scale and zero point of each block fitted by HQQ (half-quadratic, data-free).
QUANTIZE = (None, "int4", "int4-zp", "int4-hqq")
# int4: eager runs on ONNX Runtime's own dequantized weights, so the same fp32 bounds hold except
# for summation order inside MatMulNBits (blockwise dequantize-and-accumulate); the update its
# own g implies is exact either way.
_INT4 = {**EXACT, "forward": 1e-4, "loss": 1e-4, "loss_diff": 1e-4, "theta": 1e-5}
TOLERANCE = {None: FP32, "int4": _INT4, "int4-zp": _INT4, "int4-hqq": _INT4}


EVAL_SUFFIX = ".eval.onnx"


def eval_path(path: str | Path) -> Path:
    return Path(str(path) + EVAL_SUFFIX)


def program_of(path: str | Path) -> Path:
    """The step file of a program, given either of its graph files."""
    s = str(path)
    return Path(s[: -len(EVAL_SUFFIX)] if s.endswith(EVAL_SUFFIX) else s)


def step_names(momentum: float, sig: Signature) -> tuple[list[str], list[str]]:
    """Input and output names of the step graph."""
    state = ["theta", "velocity"] if momentum else ["theta"]
    outs = ["new_theta", "new_velocity"] if momentum else ["new_theta"]
    return state + ["seed", "lr", "eps", *sig.step_inputs], outs + ["loss", "g"]


def eval_names(sig: Signature) -> tuple[list[str], list[str]]:
    """Input and output names of the evaluation graph."""
    return ["theta", *sig.forward_inputs], list(sig.forward_outputs)


@contextlib.contextmanager
def bound(adapter, model, theta: torch.Tensor, velocity: torch.Tensor | None, writable: bool):
    """While tracing: the trained tensors (and the momentum buffer) are slices of the theta input
    (and the velocity input) instead of module state, so the graph reads them from its inputs.
    writable: give each its own copy, so the step's in-place update writes graph values, never
    an input. The modules' buffers are restored afterwards."""
    saved = []
    try:
        for name, v in adapter.layout.views(theta).items():  # v: a view of theta, [*shape]
            module, attr = _owner(model, name)
            saved.append((module, attr, module._buffers.pop(attr)))
            setattr(module, attr, v.clone() if writable else v)
        if velocity is not None:
            saved.append((model, VELOCITY, model._buffers.pop(VELOCITY)))
            setattr(model, VELOCITY, velocity.clone())
        yield
    finally:
        for module, attr, buf in saved:
            if attr in module.__dict__:
                delattr(module, attr)
            module.register_buffer(attr, buf)


class StatelessStep(nn.Module):
    """PRGEStep with its state as inputs and outputs: (theta, [velocity,] seed, lr, eps, *batch)
    -> (new theta, [new velocity,] mean loss, g[q])."""

    def __init__(self, step: PRGEStep):
        super().__init__()
        self.step = step
        self.momentum = step.momentum > 0

    def forward(self, theta, *args):
        velocity, args = (args[0], args[1:]) if self.momentum else (None, args)
        step = self.step
        with bound(step.adapter, step.model, theta, velocity, writable=True):
            loss, g = step(*args)
            new = step.adapter.layout.gather(step.adapter.tensors())  # [N]
            state = (new, getattr(step.model, VELOCITY)) if self.momentum else (new,)
        return (*state, loss, g)


class StatelessForward(nn.Module):
    """EvalForward with theta as an input: (theta, *batch) -> its outputs."""

    def __init__(self, forward: EvalForward):
        super().__init__()
        self.inner = forward

    def forward(self, theta, *batch):
        with bound(self.inner.adapter, self.inner.model, theta, None, writable=False):
            return self.inner(*batch)


def _to_onnx(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dynamic_shapes=None):
    """torch.onnx.export (dynamo) -> onnx.ModelProto with constants folded, the noise as uint32
    ops (onnx_rng.py).

    Only constant folding runs, not the exporter's full optimizer: its pattern rewriter cost
    about half of the export time of a tiny model and grows with the graph, and ONNX Runtime
    applies its own graph optimizations when it loads the program. Folding turns the transposed
    weights into initializers (what a MatMul, and the int4 quantizer, read)."""
    import logging
    import warnings

    import onnx_ir.passes.common as common
    from onnxscript import optimizer

    from zotune.engines.onnx_rng import TRANSLATION, traced

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad(), rng.traced_noise(traced):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            verbose=False,
            report=False,
            optimize=False,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=TRANSLATION,  # the noise in uint32 ops (onnx_rng.py)
        )
    model = program.model  # onnx_ir.Model
    optimizer.fold_constants(model)
    common.RemoveUnusedNodesPass()(model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.RemoveUnusedNodesPass()(model)
    return program.model_proto


def export_program(
    model: nn.Module,
    adapter,
    loss,
    spec: StepSpec,
    out_path: str | Path = "step.onnx",
    *,
    block_size: int = 32,
    int4_layers: str | None = None,
    dynamic_length: bool = True,
    threads: int | None = None,
    log=None,
) -> ExportReport:
    """Export the P-RGE training step of (model, adapter, loss) to an ONNX step program and an
    ONNX evaluation program (see the module docstring). Raises ExportCheckError (and writes
    nothing) if ONNX Runtime and eager PyTorch differ beyond TOLERANCE[quantize] (or
    spec.tolerance, one value for every metric). The caller's model and adapter keep their values
    (the trained tensors become registered buffers, as for ExecuTorch)."""
    from zotune.engines.ort import OrtPair

    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    sig = check_options(adapter, loss, spec, "ONNX", QUANTIZE)
    quantize = spec.quantize
    seq_len, momentum = spec.seq_len, spec.momentum
    if int4_layers is not None and not quantize:
        raise EngineError("int4 layers: a choice of layers to quantize needs quantize int4 or int4-zp")
    if quantize and block_size not in (16, 32, 64, 128, 256):
        raise EngineError(f"block size: expected 16, 32, 64, 128 or 256, got {block_size}")
    dynamic_length = bool(dynamic_length) and seq_len > sig.min_length
    tol = spec.tolerances(TOLERANCE[quantize])
    out_path = Path(out_path)
    dtype = adapter.tensors()[0].dtype
    if dtype != torch.float32:
        raise EngineError(f"the ONNX engine exports fp32 trained tensors, got {dtype}")

    trained_to_buffers(adapter)
    was_training = model.training
    model.eval()
    theta0 = theta_of(adapter)
    vocab = model.get_input_embeddings().weight.shape[0]
    n_eval = len(sig.forward_inputs)
    batch, eval_in = spec.check_inputs(sig, vocab)
    seed_t, lr_t, eps_t = spec.scalars()
    step = spec.step(model, adapter, loss)
    inputs, outputs = step_names(momentum, sig)
    eval_inputs, eval_outputs = eval_names(sig)
    state = (theta0, torch.zeros_like(theta0)) if momentum else (theta0,)
    seconds, info = {}, {}
    try:
        t0 = time.perf_counter()
        shapes = {"step": None, "forward": None}
        if dynamic_length:  # one symbolic length T <= seq_len for the batch of both graphs
            rest = length_dims(sig, seq_len)
            shapes = {"step": (None, (None,) * (len(state) - 1 + 3) + rest), "forward": (None, rest[:n_eval])}
        protos = {
            "step": _to_onnx(
                StatelessStep(step), (*state, seed_t, lr_t, eps_t, *batch), inputs, outputs, shapes["step"]
            ),
            "forward": _to_onnx(
                StatelessForward(EvalForward(model, adapter, loss)),
                (theta0, *eval_in),
                eval_inputs,
                eval_outputs,
                shapes["forward"],
            ),
        }
        seconds["export"] = time.perf_counter() - t0
        say(f"torch.onnx.export (2 graphs): {seconds['export']:.1f} s")
        ref_model, ref_adapter, ref_step = model, adapter, step
        if quantize:
            from zotune.engines.onnx_int4 import dequantized_weights, quantize_int4

            t0 = time.perf_counter()
            names = None
            for key in ("step", "forward"):
                protos[key], names = quantize_int4(
                    protos[key], model, adapter, block_size, quantize, int4_layers
                )
            # Which MatMul is which base linear: what a reader needs to dequantize the program.
            info["quantized"] = {node: list(v) for node, v in names.items()}
            info["int4_layers"] = int4_layers
            seconds["quantize"] = time.perf_counter() - t0
            say(
                f"int4: {len(names)} base linears as MatMulNBits (block {block_size}), "
                f"{seconds['quantize']:.1f} s"
            )
            # The eager reference: a copy of the model computing with the dequantized blocks.
            ref_model, ref_adapter = copy.deepcopy((model, adapter))
            with torch.no_grad():
                for fqn, w in dequantized_weights(protos["forward"], names).items():
                    ref_model.get_submodule(fqn).weight.copy_(w)
            trained_to_buffers(ref_adapter)
            ref_step = spec.step(ref_model, ref_adapter, loss)
        tensors = lift_weights(protos)
        data = {k: p.SerializeToString() for k, p in protos.items()}
        del protos
        data["weights"] = save_weights(tensors)
        say(
            f"ONNX: step {len(data['step']) / 2**20:.1f} MiB, forward {len(data['forward']) / 2**20:.1f} "
            f"MiB, weights {len(data['weights']) / 2**20:.1f} MiB ({len(tensors)} tensors)"
        )

        t0 = time.perf_counter()
        theta_c, velocity_c = check_values(theta0, momentum, spec.check_seed)
        pair = OrtPair(data["step"], data["forward"], momentum > 0, sig, threads, weights=tensors)
        cases = [(batch, eval_in)]
        if dynamic_length:  # and at a shorter length, as device-train runs trimmed batches
            cases.append(spec.check_inputs(sig, vocab, max(sig.min_length, seq_len // 2), case=1))
        ref = SimpleNamespace(step=ref_step, adapter=ref_adapter, loss=loss, model=ref_model)
        ref.seed_t, ref.lr_t, ref.eps_t = seed_t, lr_t, eps_t
        check = {}
        for ref.batch, ref.eval_in in cases:
            got = pair.check_run(theta_c, velocity_c, seed_t, lr_t, eps_t, ref.batch, ref.eval_in)
            one = parity_metrics(got, ref, theta_c, velocity_c)
            check = {k: max(v, check.get(k, v)) for k, v in one.items()}
        del pair, tensors
        seconds["check"] = time.perf_counter() - t0
    finally:
        set_theta(adapter, theta0)  # the eager check moved theta: give the caller its own back
        model._buffers.pop(VELOCITY, None)
        model.train(was_training)
    say(f"parity vs eager: {check}")
    gate(check, tol, f"ONNX Runtime program{f' ({quantize})' if quantize else ''}", out_path)

    meta = {
        "format": FORMAT_VERSION,
        "engine": ENGINE,
        "graphs": {
            "step": {"inputs": inputs, "outputs": outputs},
            "forward": {
                "inputs": eval_inputs,
                "outputs": eval_outputs,
                "file": eval_path(out_path).name,
                "size": len(data["forward"]),
                "sha256": sha256_bytes(data["forward"]),
            },
        },
        "weights": {
            "file": weights_path(out_path).name,
            "size": len(data["weights"]),
            "sha256": sha256_bytes(data["weights"]),
        },
        **spec.meta(sig, model, adapter, loss, theta0),
        "block_size": block_size if quantize else None,
        "dynamic_length": dynamic_length,
        **info,
        "opset": OPSET,
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "check": check,
        "tolerance": tol,
        "size": len(data["step"]),
        "sha256": sha256_bytes(data["step"]),
    }
    # The weights and the eval graph first: the step file and its sidecar are what a reader opens.
    atomic_write_bytes(weights_path(out_path), data["weights"])
    atomic_write_bytes(eval_path(out_path), data["forward"])
    atomic_write_bytes(out_path, data["step"])
    atomic_write_text(sidecar_path(out_path), json.dumps(meta, indent=1))
    seconds["total"] = time.perf_counter() - t_start
    return ExportReport(
        str(out_path),
        str(sidecar_path(out_path)),
        len(data["step"]),
        meta["sha256"],
        seconds,
        check,
        tol,
        {},
        meta,
    )


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - only informative
        return "unknown"


__all__ = [
    "export_program",
    "eval_path",
    "program_of",
    "eval_names",
    "step_names",
    "ENGINE",
    "TOLERANCE",
    "QUANTIZE",
]
