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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import zotune
from zotune.engines.export_common import (
    FORMAT_VERSION, EngineError, ExportCheckError, ProgramFileError, check_batch, check_expected,
    check_layout, flat_trained, flatten, layout, load_flat, read_sidecar,
    sidecar_path, trained_to_buffers, unflatten, verify_file, write_atomic,
)
from zotune.engines._graph_passes import PASSES
from zotune.estimators.prge import PRGEStep

ENGINE = "executorch"
METHODS = ("train_step", "forward", "get_lora", "set_lora")
QUANTIZE = (None, "8da4w")
# Default parity tolerances (max abs difference of loss and of theta after one step).
TOLERANCE = {None: 1e-5, "8da4w": 5e-3}


# ---------------------------------------------------------------------------------------------
# The exported methods. Each registers the model under the same attribute name ("model"), so a
# trained buffer has the same fully qualified name in every method: that is what
# share_mutable_buffers keys on.

class _TrainStep(nn.Module):
    """PRGEStep itself, held outside the module tree: PRGEStep.buffers (its momentum list, None
    without momentum) shadows nn.Module.buffers(), which torch.export calls on every submodule.
    The model is registered here, so the trained buffers keep the names "model.<...>"."""

    def __init__(self, step: PRGEStep):
        super().__init__()
        self.model = step.model
        object.__setattr__(self, "_step", step)

    def forward(self, seed, lr, eps, input_ids, attention_mask, position_ids, choice_ids, labels):
        return self._step(seed, lr, eps, input_ids, attention_mask, position_ids, choice_ids,
                          labels)


class _Forward(nn.Module):
    """Choice logits with the current theta. The adapted layers run in replica mode with a single
    replica, so theta enters only through bmm (never as a linear weight a backend could pack)."""

    def __init__(self, model, adapter, loss):
        super().__init__()
        self.model, self.adapter, self.loss = model, adapter, loss

    def forward(self, input_ids, attention_mask, position_ids, choice_ids):
        stacks = {}
        for name, layer in self.adapter.layers.items():
            a = layer.lora_A.unsqueeze(0) if self.adapter.train_a else None
            stacks[name] = (a, layer.lora_B.unsqueeze(0))
        self.adapter.set_replicas(stacks)
        try:
            return self.loss.logits(self.model, input_ids, attention_mask, position_ids, choice_ids)
        finally:
            self.adapter.set_replicas(None)


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


# ---------------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    path: str
    sidecar: str
    size: int
    sha256: str
    seconds: dict = field(default_factory=dict)  # export / lower / emit / check / total
    check: dict = field(default_factory=dict)  # max abs differences against eager
    tolerance: float = 0.0
    portable_ops: dict = field(default_factory=dict)  # non-delegated ops per method
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _quantize_8da4w(model: nn.Module, adapter, group_size: int) -> list[str]:
    """torchao 8da4w on the frozen base linears of the decoder only: not LoRA A/B, not the
    embedding / LM head (whose rows score the label words)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = {id(m.weight) for m in (head, emb) if m is not None}
    chosen = []

    def keep(module, fqn):
        # LoRA A/B are plain tensors of LoRALinear, never nn.Linear modules: only base linears
        # (and the head, excluded here) can match.
        ok = (isinstance(module, nn.Linear) and module is not head
              and id(module.weight) not in tied and module.in_features % group_size == 0)
        if ok:
            chosen.append(fqn)
        return ok

    quantize_(model, Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)), filter_fn=keep)
    return chosen


class _KeepStatePartitioner:
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


class _attention:
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


class _cheap_provenance:
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


def _portable_ops(ep) -> int:
    n = 0
    for node in ep.graph.nodes:
        if node.op == "call_function" and "getitem" not in str(node.target) \
                and "executorch_call_delegate" not in str(node.target):
            n += 1
    return n


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def export_program(model: nn.Module, adapter, loss, q: int, b: int, seq_len: int, n_choices: int,
                   dual: bool = True, noise: str = "normal", quantize: str | None = None,
                   out_path: str | Path = "model.pte", *, eval_batch: int | None = None,
                   model_name: str | None = None, xnnpack: bool = True, group_size: int = 32,
                   tolerance: float | None = None, check_seed: int = 12345,
                   check_lr: float = 1e-3, check_eps: float = 1e-2,
                   attention: str | None = "eager", step_factory=None, log=None) -> ExportReport:
    """Export the P-RGE training step of (model, adapter, loss) to one ExecuTorch program.

    The adapter's trained tensors become registered buffers of `model` (in place, values kept;
    eager use of model and adapter is unaffected). With quantize="8da4w" the export works on a
    deep copy, so the caller's model stays fp32. Raises ExportCheckError (and writes nothing) if
    the lowered program and eager PyTorch differ by more than `tolerance` in the loss, the loss
    differences behind g (2 eps g), theta after one step, or the forward logits (relative to
    max(1, |logits|)). `step_factory` builds the step module to trace (default: PRGEStep with
    fused noise); it must update `adapter.trained` in place and return (loss, g)."""
    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    if quantize not in QUANTIZE:
        raise EngineError(f"quantize: expected one of {QUANTIZE}, got {quantize!r}")
    if noise not in ("normal", "rademacher"):
        raise EngineError(f"noise: expected 'normal' or 'rademacher', got {noise!r}")
    if not hasattr(adapter, "layers"):
        raise EngineError("the ExecuTorch engine exports LoRA / LoRA-FA adapters only "
                          "(full-parameter training has no compact trained state)")
    if getattr(loss, "kind", None) != "classification" or getattr(loss, "via_head_module", False):
        raise EngineError("the ExecuTorch engine exports the classification loss "
                          "(label-word logits at the last position)")
    for name, v in (("q", q), ("b", b), ("seq_len", seq_len), ("n_choices", n_choices)):
        if int(v) < 1 or (name == "n_choices" and v < 2):
            raise EngineError(f"{name} must be a positive integer (n_choices >= 2), got {v}")
    eval_batch = eval_batch or b
    tol = TOLERANCE[quantize] if tolerance is None else tolerance
    out_path = Path(out_path)
    dtype = adapter.trained[0].tensor.dtype

    trained_to_buffers(adapter)
    if quantize:
        # quantize_ rewrites modules in place: work on a copy so the caller's model stays fp32.
        model, adapter = copy.deepcopy((model, adapter))
        quantized = _quantize_8da4w(model, adapter, group_size)
        say(f"8da4w: quantized {len(quantized)} linear layers (group size {group_size})")
    was_training = model.training
    model.eval()
    theta0 = flat_trained(adapter)
    lay = layout(adapter)
    state_fqns = [f"model.{t.name}" for t in adapter.trained]

    vocab = model.get_input_embeddings().weight.shape[0]
    batch = check_batch(vocab, b, seq_len, n_choices, seed=check_seed)
    eval_in = check_batch(vocab, eval_batch, seq_len, n_choices, seed=check_seed + 1)[:4]
    seed_t = torch.tensor([check_seed], dtype=torch.int64)
    lr_t = torch.tensor([check_lr], dtype=torch.float32)
    eps_t = torch.tensor([check_eps], dtype=torch.float32)

    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, \
        to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    if step_factory is None:
        step = PRGEStep(model, adapter, loss, q, dual=dual, noise=noise, fused_noise=True)
    else:
        step = step_factory(model, adapter, loss, q, dual, noise)
    modules = {
        "train_step": (_TrainStep(step), (seed_t, lr_t, eps_t, *batch)),
        "forward": (_Forward(model, adapter, loss), eval_in),
        "get_lora": (_GetLora(model, adapter), ()),
        "set_lora": (_SetLora(model, adapter), (theta0.clone(),)),
    }
    seconds = {}
    try:
        t0 = time.perf_counter()
        programs = {}
        # MATH sdpa while tracing: the fused CPU kernel reports transposed output strides, so the
        # model's .contiguous() after attention is traced away and the views after it break once
        # to_edge decomposes sdpa (with different strides).
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), _attention(model, attention):
            for name, (mod, args) in modules.items():
                programs[name] = torch.export.export(mod, tuple(args), strict=False)
        seconds["export"] = time.perf_counter() - t0
        say(f"torch.export: {seconds['export']:.1f} s")

        t0 = time.perf_counter()
        partitioners = {name: [] for name in METHODS}
        if xnnpack:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import \
                XnnpackPartitioner
            for name in ("train_step", "forward"):
                partitioners[name] = [_KeepStatePartitioner(XnnpackPartitioner(), state_fqns)]
        with sdpa_kernel([SDPBackend.MATH]), _cheap_provenance():  # same sdpa strides as traced
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
        portable = {name: _portable_ops(edge.exported_program(name)) for name in METHODS}
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
        theta_c = (torch.randn(theta0.shape, generator=torch.Generator().manual_seed(check_seed))
                   * 0.02).to(dtype)
        check = _parity_check(data, step, adapter, loss, model, theta_c, seed_t, lr_t, eps_t,
                              batch, eval_in)
        seconds["check"] = time.perf_counter() - t0
    finally:
        load_flat(adapter, theta0)  # the eager check moved theta: give the caller its own back
        model.train(was_training)
    say(f"parity vs eager: {check}")
    bad = {k: v for k, v in check.items() if not (v <= tol)}  # NaN counts as bad
    if bad:
        raise ExportCheckError(
            f"the lowered ExecuTorch program differs from eager PyTorch by more than {tol:g}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
            + f"; nothing was written to {out_path}")

    meta = {
        "format": FORMAT_VERSION, "engine": ENGINE, "methods": list(METHODS),
        "q": int(q), "b": int(b), "seq_len": int(seq_len), "n_choices": int(n_choices),
        "eval_batch": int(eval_batch), "numel": int(adapter.numel), "noise": noise,
        "dual": bool(dual), "quantize": quantize, "group_size": group_size if quantize else None,
        "xnnpack": bool(xnnpack), "loss": loss.kind, "dtype": str(dtype).replace("torch.", ""),
        "model": (model_name or getattr(model.config, "_name_or_path", "")
                  or model.config.model_type),
        "model_type": model.config.model_type, "layout": lay,
        "init": "zeros" if not theta0.any() else "given",
        "zotune": zotune.__version__, "torch": torch.__version__, "executorch": _et_version(),
        "check": check, "tolerance": tol,
        "size": len(data), "sha256": _sha256_bytes(data),
    }
    write_atomic(out_path, data)
    write_atomic(sidecar_path(out_path), json.dumps(meta, indent=1))
    seconds["total"] = time.perf_counter() - t_start
    return ExportReport(str(out_path), str(sidecar_path(out_path)), len(data), meta["sha256"],
                        seconds, check, tol, portable, meta)


def _sha256_bytes(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def _et_version() -> str:
    try:
        from importlib.metadata import version
        return version("executorch")
    except Exception:  # noqa: BLE001 - only informative
        return "unknown"


@torch.no_grad()
def _parity_check(data: bytes, step, adapter, loss, model, theta, seed_t, lr_t, eps_t, batch,
                  eval_in) -> dict:
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(data)
    methods = {name: program.load_method(name) for name in METHODS}  # all before any step
    methods["set_lora"].execute([theta.clone()])
    got = methods["get_lora"].execute([])[0]
    logits_pte = methods["forward"].execute(list(eval_in))[0]
    loss_pte, g_pte = methods["train_step"].execute([seed_t, lr_t, eps_t, *batch])
    theta_pte = methods["get_lora"].execute([])[0]

    load_flat(adapter, theta)
    logits_eager = loss.logits(model, *eval_in)
    loss_eager, g_eager = step(seed_t, lr_t, eps_t, *batch)
    theta_eager = flat_trained(adapter)
    return {
        "set_get": _max_diff(got, theta),
        # Logits are compared relative to their scale (real LMs give logits of 10-30).
        "forward": _max_diff(logits_pte, logits_eager)
        / max(1.0, float(logits_eager.abs().max())),
        "loss": _max_diff(loss_pte, loss_eager),
        # g = (l+ - l-) / (2 eps): compare the loss differences it comes from.
        "loss_diff": _max_diff(g_pte * 2 * eps_t, g_eager * 2 * eps_t),
        "theta": _max_diff(theta_pte, theta_eager),
    }


# ---------------------------------------------------------------------------------------------
# Runtime side.

_EXPECTABLE = {"q", "b", "seq_len", "n_choices", "eval_batch", "numel", "noise", "dual",
               "quantize", "model", "model_type", "loss", "dtype"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PteProgram:
    """A loaded training program: all four methods, one shared theta.

    theta is always initialised through set_lora when the program is loaded (the runtime's arena
    holds no meaningful initial value): zeros for LoRA-FA, or the `lora` given to `load`."""

    def __init__(self, path: Path, meta: dict, program, methods: dict):
        self.path, self.meta, self._program, self._methods = path, meta, program, methods
        self.q, self.b, self.seq_len = meta["q"], meta["b"], meta["seq_len"]
        self.n_choices, self.eval_batch, self.numel = (meta["n_choices"], meta["eval_batch"],
                                                       meta["numel"])
        self.tensors = meta["layout"]["tensors"]
        self.dtype = _DTYPES.get(meta.get("dtype", "float32"), torch.float32)

    @classmethod
    def load(cls, path: str | Path, *, adapter=None, lora=None, verify: bool = True,
             **expect) -> "PteProgram":
        """Open a program written by export_program.

        adapter: if given, its layout (names, shapes, offsets, rank, alpha) must match.
        lora: initial theta (dict name -> tensor, or flat [N]); default zeros.
        expect: fields that must match the program's metadata, e.g. q=4, b=4, seq_len=64.
        verify: check size and sha256 of the file against its metadata (reads the whole file)."""
        unknown = sorted(set(expect) - _EXPECTABLE)
        if unknown:
            raise TypeError(f"PteProgram.load: unknown fields {unknown} (known: "
                            f"{sorted(_EXPECTABLE)})")
        path = Path(path)
        meta = read_sidecar(path, ENGINE)
        if verify:
            verify_file(path, meta)
        check_expected(path, meta, expect)
        if adapter is not None:
            check_layout(path, meta, adapter)
        from executorch.runtime import Runtime

        try:
            program = Runtime.get().load_program(path)
        except Exception as e:  # the bindings raise RuntimeError/ValueError with an error code
            raise ProgramFileError(f"{path}: ExecuTorch cannot load this program ({e}); "
                                   "re-export it") from None
        missing = [m for m in METHODS if m not in program.method_names]
        if missing:
            raise ProgramFileError(f"{path}: program has no method(s) {missing}")
        self = cls(path, meta, program, {})
        self._check_shapes()  # before loading: a mismatch must not cost the weight packing
        for name in METHODS:  # load every method up front: they share one theta
            try:
                self._methods[name] = program.load_method(name)
            except Exception as e:  # noqa: BLE001
                raise ProgramFileError(f"{path}: method '{name}' does not load ({e}); this "
                                       "runtime may lack a kernel or backend it needs") from None
        if lora is None:
            if meta.get("init") not in (None, "zeros"):
                raise EngineError(f"{path}: the trained tensors did not start at zero when this "
                                  "program was exported: pass their values as lora=")
            lora = torch.zeros(self.numel, dtype=self.dtype)
        self.set_lora(lora)
        return self

    def _check_shapes(self) -> None:
        want = {
            "train_step": [[1], [1], [1], [self.b, self.seq_len], [self.b, self.seq_len],
                           [self.b, self.seq_len], [self.b, self.n_choices], [self.b]],
            "forward": [[self.eval_batch, self.seq_len]] * 3 + [[self.eval_batch, self.n_choices]],
            "set_lora": [[self.numel]],
        }
        for name, shapes in want.items():
            meta = self._program.metadata(name)
            have = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
            if have != shapes:
                raise ProgramFileError(f"{self.path}: method '{name}' takes inputs {have}, its "
                                       f"metadata implies {shapes}: program and metadata do not "
                                       "belong together; re-export it")

    # -- methods ---------------------------------------------------------------------------

    def _check_batch(self, batch, rows: int, n: int, what: str) -> list[torch.Tensor]:
        if len(batch) != n:
            raise EngineError(f"{what}: expected {n} batch tensors (input_ids, attention_mask, "
                              f"position_ids, choice_ids{', labels' if n == 5 else ''}), "
                              f"got {len(batch)}")
        shapes = [(rows, self.seq_len)] * 3 + [(rows, self.n_choices), (rows,)]
        out = []
        for i, (t, shape) in enumerate(zip(batch, shapes)):
            t = torch.as_tensor(t)
            if tuple(t.shape) != shape:
                raise EngineError(f"{what}: batch tensor {i} has shape {tuple(t.shape)}, this "
                                  f"program was exported for {shape} (q={self.q}, b={self.b}, "
                                  f"T={self.seq_len}, C={self.n_choices}, eval batch "
                                  f"{self.eval_batch}); pad the batch or re-export")
            out.append(t.to(torch.int64).contiguous())
        return out

    def train_step(self, seed: int, lr: float, eps: float, batch) -> tuple[float, torch.Tensor]:
        """One P-RGE step on the program's theta. -> (mean loss, g[q])"""
        inputs = [torch.tensor([int(seed)], dtype=torch.int64),
                  torch.tensor([float(lr)], dtype=torch.float32),
                  torch.tensor([float(eps)], dtype=torch.float32),
                  *self._check_batch(batch, self.b, 5, "train_step")]
        loss, g = self._methods["train_step"].execute(inputs)
        return float(loss), g

    def forward(self, input_ids, attention_mask, position_ids, choice_ids) -> torch.Tensor:
        """Choice logits [eval_batch, C] with the current theta."""
        batch = self._check_batch((input_ids, attention_mask, position_ids, choice_ids),
                                  self.eval_batch, 4, "forward")
        return self._methods["forward"].execute(batch)[0]

    def scores(self, input_ids, attention_mask, position_ids, choice_ids) -> torch.Tensor:
        """Choice logits for any number of rows: chunks of the static eval batch, the last one
        padded with copies of its first row (rows are independent, padding is discarded)."""
        tensors = [torch.as_tensor(t) for t in (input_ids, attention_mask, position_ids,
                                                choice_ids)]
        rows, be = tensors[0].shape[0], self.eval_batch
        out = []
        for start in range(0, rows, be):
            chunk = [t[start: start + be] for t in tensors]
            n = chunk[0].shape[0]
            if n < be:
                chunk = [torch.cat([c, c[:1].expand(be - n, *c.shape[1:])]) for c in chunk]
            out.append(self.forward(*chunk)[:n])
        return torch.cat(out) if out else torch.zeros(0, self.n_choices)

    def get_lora_flat(self) -> torch.Tensor:
        return self._methods["get_lora"].execute([])[0]

    def get_lora(self) -> dict[str, torch.Tensor]:
        """The trained tensors, unflattened with the program's layout."""
        return unflatten(self.get_lora_flat(), self.tensors)

    def set_lora(self, lora) -> None:
        """Set theta from a dict name -> tensor (extra keys ignored) or a flat [N] tensor."""
        if isinstance(lora, dict):
            flat = flatten(lora, self.tensors, self.dtype)
        else:
            flat = torch.as_tensor(lora).detach().to(self.dtype).reshape(-1)
            if flat.numel() != self.numel:
                raise EngineError(f"set_lora: {flat.numel()} values, the program holds "
                                  f"{self.numel}")
        if not bool(torch.isfinite(flat).all()):
            raise EngineError("set_lora: values are not all finite")
        self._methods["set_lora"].execute([flat.contiguous()])


class ExecuTorchEngine:
    """A loaded program behind the surface the training loop uses for every engine (the same
    methods as EagerEngine): step, scores, state / load_state, adapter_state.

    frozen: tensors the program does not hold but an adapter file needs (LoRA-FA's A matrices,
    e.g. `adapter.state()` of the eager adapter the program was exported from)."""

    name = "executorch"

    def __init__(self, program: PteProgram, frozen: dict[str, torch.Tensor] | None = None):
        self.program, self.frozen = program, dict(frozen or {})
        self.kind = "classification"

    def step(self, batch, seed: int, lr: float, eps: float):
        return self.program.train_step(seed, lr, eps, batch)

    def scores(self, batch) -> tuple[torch.Tensor, ...]:
        return (self.program.scores(*batch[:4]),)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        out = {k: v.clone() for k, v in self.frozen.items()}
        out.update(self.program.get_lora())
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {f"param.{k}": v for k, v in self.program.get_lora().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.program.set_lora({k[len("param."):]: v for k, v in tensors.items()
                               if k.startswith("param.")})


__all__ = ["export_program", "ExportReport", "PteProgram", "ExecuTorchEngine", "ENGINE",
           "METHODS", "TOLERANCE", "EngineError", "ExportCheckError", "ProgramFileError"]
