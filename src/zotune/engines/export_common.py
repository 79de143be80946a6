"""What every exporter of the training step shares: the trained tensors as buffers, a check batch,
the sidecar metadata and its hash, and the checks a loaded program goes through.

Exported programs carry the trained tensors as state (ExecuTorch: mutable buffers) or as an
input/output pair (ONNX). Either way the host talks to them through one flat vector theta of N
values laid out as the adapter's `ThetaLayout` says (name, shape, offset), the same layout the
hash RNG draws z in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from zotune.adapters.theta import ThetaLayout
from zotune.data.jsonl import get_field
from zotune.engines.signature import KINDS, Signature
from zotune.errors import FormatError, ZotuneError, reading
from zotune.loss import score_outputs

# The sidecar's format; its "layout" field is a ThetaLayout in its own versioned JSON form.
FORMAT_VERSION = 2
SIDECAR_FIELDS = tuple(
    (name, int) for name in ("q", "b", "seq_len", "n_choices", "eval_batch", "numel", "size")
) + (("momentum", (int, float)), ("sha256", str), ("layout", dict))


class EngineError(ZotuneError):
    """An exported program cannot be built or used (wrong inputs, unsupported options)."""


class ExportCheckError(EngineError):
    """The lowered program does not reproduce the eager step within tolerance (nothing written)."""


class ProgramFileError(EngineError):
    """An exported program file is missing, corrupted, or does not match what was asked for."""


class ProgramFormatError(FormatError, ProgramFileError):
    """A program's metadata or frozen-tensor file that cannot be decoded or parsed."""


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


def trained_to_buffers(adapter) -> list[str]:
    """Turn every trained tensor of the adapter into a registered buffer of the same name.

    torch.export does not allow mutating parameters; buffers written in place become mutable state
    of the exported program. The values are kept (the buffer shares the parameter's storage), and
    the adapter reads its tensors through their modules (`adapter.tensors()`), so it, eager
    PRGEStep and `state()`/`load_state()` keep working on the same tensors, eagerly and under
    tracing. Idempotent. Returns the trained tensor names (relative to the model)."""
    for name in adapter.layout.names:
        module, attr = _owner(adapter.model, name)
        if attr in module._parameters:
            value = module._parameters.pop(attr).detach()
            module.register_buffer(attr, value, persistent=True)
    return adapter.layout.names


class EvalForward(nn.Module):
    """The evaluation method: what `loss.score_outputs` returns for a batch (signature.py), with
    the current theta. The adapted layers run in replica mode with a single replica, so theta
    enters only through bmm (never as a linear weight a backend could pack or quantize)."""

    def __init__(self, model, adapter, loss):
        super().__init__()
        self.model, self.adapter, self.loss = model, adapter, loss

    def forward(self, *batch):
        stacks = {}
        for name, layer in self.adapter.layers.items():
            a = layer.lora_A.unsqueeze(0) if self.adapter.train_a else None
            stacks[name] = (a, layer.lora_B.unsqueeze(0))
        self.adapter.set_replicas(stacks)
        try:
            return score_outputs(self.loss, self.model, batch)
        finally:
            self.adapter.set_replicas(None)


@dataclass(frozen=True)
class StepSpec:
    """What an exported step is specialised to (its shapes and options: one program per spec),
    and the inputs of the parity check that gates it. Both exporters take one."""

    q: int  # query directions
    b: int  # rows of a training batch
    seq_len: int  # T: the (largest) sequence length
    n_choices: int  # C: label words, or the most choices of an example
    n_target: int = 0  # L: target positions of the choice and generation losses
    eval_batch: int | None = None  # rows of the evaluation program (None: b)
    dual: bool = True
    noise: str = "normal"
    momentum: float = 0.0
    quantize: str | None = None  # the frozen base's quantization (each engine names its own)
    model_name: str | None = None  # what the sidecar calls the model (None: its config's name)
    tolerance: float | None = None  # one bound for every metric instead of the engine's table
    check_seed: int = 12345
    check_lr: float = 1e-3
    check_eps: float = 1e-2

    @property
    def eval_rows(self) -> int:
        return self.eval_batch or self.b

    def tolerances(self, table: dict[str, float]) -> dict[str, float]:
        return dict(table) if self.tolerance is None else {k: float(self.tolerance) for k in table}

    def step(self, model, adapter, loss):
        """The P-RGE step the program runs (fused noise: z for all layers in one hash call);
        registers the model's VELOCITY buffer when momentum > 0."""
        from zotune.estimators.prge import PRGEStep

        options = dict(dual=self.dual, noise=self.noise, momentum=self.momentum)
        return PRGEStep(model, adapter, loss, self.q, **options, fused_noise=True)

    def meta(self, sig: Signature, model, adapter, loss, theta0: torch.Tensor) -> dict:
        """What every sidecar records of the program: shapes and options (what device-train
        checks), the loss, the model, theta's layout and start, and the versions."""
        import zotune

        dtype = str(adapter.tensors()[0].dtype).replace("torch.", "")
        return {
            "q": int(self.q),
            "b": int(self.b),
            "seq_len": int(self.seq_len),
            "n_choices": int(sig.n_choices),
            "n_target": int(sig.n_target),
            "eval_batch": int(self.eval_rows),
            "noise": self.noise,
            "dual": bool(self.dual),
            "momentum": float(self.momentum),
            "numel": int(adapter.numel),
            "loss": loss.kind,
            "dtype": dtype,
            "quantize": self.quantize,
            "model": self.model_name or getattr(model.config, "_name_or_path", "") or model.config.model_type,
            "model_type": model.config.model_type,
            "layout": adapter.layout.to_json(),
            "init": "zeros" if not theta0.any() else "given",
            "zotune": zotune.__version__,
            "torch": torch.__version__,
        }

    def scalars(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The check step's seed [1] i64, lr [1] f32 and eps [1] f32."""
        return (
            torch.tensor([self.check_seed], dtype=torch.int64),
            torch.tensor([self.check_lr], dtype=torch.float32),
            torch.tensor([self.check_eps], dtype=torch.float32),
        )

    def check_inputs(self, sig: Signature, vocab: int, length: int | None = None, case: int = 0):
        """A synthetic training batch and evaluation batch of the program's signature, at
        `length` (default seq_len); `case` picks another pair of seeds."""
        length = length or self.seq_len
        seed = self.check_seed + 2 * case
        batch = sig.check_batch(vocab, self.b, length, seed=seed)
        eval_in = sig.check_batch(vocab, self.eval_rows, length, seed=seed + 1)[: len(sig.forward_inputs)]
        return batch, eval_in


def check_options(adapter, loss, spec: StepSpec, what: str, quantize: tuple) -> Signature:
    """What every exporter of the step supports (and the quantizations this one offers),
    checked before any tracing. -> the batch signature of the program"""
    if spec.quantize not in quantize:
        raise EngineError(f"quantize: expected one of {quantize}, got {spec.quantize!r}")
    if spec.noise not in ("normal", "rademacher"):
        raise EngineError(f"noise: expected 'normal' or 'rademacher', got {spec.noise!r}")
    if not hasattr(adapter, "layers"):
        raise EngineError(
            f"the {what} engine exports LoRA / LoRA-FA adapters only "
            "(full-parameter training has no compact trained state)"
        )
    kind = getattr(loss, "kind", None)
    if kind not in KINDS or (kind == "classification" and getattr(loss, "via_head_module", False)):
        raise EngineError(
            f"the {what} engine exports the classification loss (label-word logits at the last "
            "position), the multiple-choice loss and the completion-token loss"
        )
    if not 0.0 <= spec.momentum < 1.0:
        raise EngineError(f"momentum: expected a value in [0, 1), got {spec.momentum!r}")
    for name in ("q", "b", "seq_len"):
        if int(getattr(spec, name)) < 1:
            raise EngineError(f"{name} must be a positive integer, got {getattr(spec, name)}")
    sig = Signature(kind, int(spec.n_choices), int(spec.n_target or 0))
    problems = sig.problems(spec.seq_len)
    if problems:
        raise EngineError("; ".join(problems))
    return sig


@dataclass
class ExportReport:
    path: str
    sidecar: str
    size: int
    sha256: str
    seconds: dict = field(default_factory=dict)  # the exporter's stages, and total
    check: dict = field(default_factory=dict)  # max abs differences against eager
    tolerance: dict = field(default_factory=dict)  # metric -> max allowed (gated metrics only)
    portable_ops: dict = field(default_factory=dict)  # non-delegated ops per method (ExecuTorch)
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def read_engine(path: str | Path) -> str:
    """The engine named in a program's metadata (for picking the runtime that opens it); without
    readable metadata, the one its suffix implies (read_sidecar then reports what is wrong)."""
    try:
        engine = json.loads(sidecar_path(path).read_text()).get("engine")
    except (OSError, ValueError, AttributeError):
        engine = None
    if engine:
        return str(engine)
    return {".pte": "executorch", ".onnx": "onnx"}.get(Path(path).suffix, "executorch")


def read_sidecar(path: str | Path, engine: str) -> dict:
    """The metadata written beside an exported program, checked for presence and format."""
    path = Path(path)
    if not path.is_file():
        raise ProgramFileError(f"{path}: program file does not exist")
    side = sidecar_path(path)
    if not side.is_file():
        raise ProgramFileError(
            f"{path}: its metadata file {side.name} is missing "
            "(export the program with zotune, which writes both)"
        )
    expected = f"the JSON metadata of a zotune {engine} program; re-export the program"
    with reading(side, expected, error=ProgramFormatError):
        meta = json.loads(side.read_bytes().decode("utf-8"))
        if not isinstance(meta, dict) or meta.get("engine") != engine:
            raise ProgramFileError(f"{side}: not the metadata of a zotune {engine} program")
        if meta.get("format") != FORMAT_VERSION:
            raise ProgramFileError(
                f"{side}: metadata format {meta.get('format')}, this zotune reads "
                f"format {FORMAT_VERSION}; re-export the program"
            )
        for name, types in SIDECAR_FIELDS:  # what loading the program reads
            get_field(meta, name, types, side, error=ProgramFormatError)
    return meta


def length_dims(sig: Signature, seq_len: int, hint: bool = False) -> tuple:
    """torch.export dynamic shapes of a step batch with one symbolic length T in
    [sig.min_length, seq_len], one entry per step input (the forward's inputs are the first).
    hint: a Dim.DYNAMIC hint instead of a named Dim, so that guards the tracer cannot prove
    symbolically (but that hold for every T >= 1) are kept rather than refused."""
    lo, hi = sig.min_length, int(seq_len)
    dim = torch.export.Dim.DYNAMIC(min=lo, max=hi) if hint else torch.export.Dim("T", min=lo, max=hi)
    t = {sig.length_dim: dim}
    return (t,) * 3 + (None,) * (len(sig.step_inputs) - 3)


def verify_file(path: str | Path, meta: dict) -> None:
    """The program bytes are exactly the ones the metadata describes (size, then sha256)."""
    path = Path(path)
    size = path.stat().st_size
    if size != meta.get("size"):
        raise ProgramFileError(
            f"{path}: {size} bytes, its metadata says {meta.get('size')} "
            "(truncated, corrupted or replaced; re-export it)"
        )
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise ProgramFileError(
            f"{path}: sha256 {digest[:12]}... does not match its metadata "
            f"({str(meta.get('sha256'))[:12]}...): corrupted or replaced; "
            "re-export it"
        )


def check_expected(path, meta: dict, expect: dict) -> None:
    """Fields the caller needs (q, b, seq_len, ...) against those the program was built with."""
    wrong = [
        f"{k}: program has {meta.get(k)!r}, expected {v!r}"
        for k, v in expect.items()
        if v is not None and meta.get(k) != v
    ]
    if wrong:
        raise ProgramFileError(
            f"{path}: built for a different configuration (" + "; ".join(wrong) + "); re-export it"
        )


def program_layout(path, meta: dict) -> ThetaLayout:
    """The theta layout an exported program was built for, from its metadata."""
    try:
        return ThetaLayout.from_json(meta.get("layout"), f"{sidecar_path(path)}: field 'layout'")
    except ZotuneError as e:
        raise ProgramFileError(f"{e}; re-export the program") from None


def check_layout(path, layout: ThetaLayout, adapter) -> None:
    """The program's theta layout against the caller's adapter."""
    diff = layout.mismatch(adapter.layout)
    if diff:
        raise ProgramFileError(
            f"{path}: the program's adapter layout differs from this adapter's ({diff}); re-export it"
        )
