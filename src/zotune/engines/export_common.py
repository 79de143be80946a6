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

import torch.nn as nn

from zotune.adapters.theta import ThetaLayout
from zotune.engines.signature import KINDS, Signature
from zotune.errors import ZotuneError
from zotune.loss import score_outputs

# The sidecar's format; its "layout" field is a ThetaLayout in its own versioned JSON form.
FORMAT_VERSION = 2


class EngineError(ZotuneError):
    """An exported program cannot be built or used (wrong inputs, unsupported options)."""


class ExportCheckError(EngineError):
    """The lowered program does not reproduce the eager step within tolerance (nothing written)."""


class ProgramFileError(EngineError):
    """An exported program file is missing, corrupted, or does not match what was asked for."""


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


def check_options(adapter, loss, q, b, seq_len, n_choices, n_target, noise, momentum, what: str) -> Signature:
    """What every exporter of the step supports, checked before any tracing. -> the batch
    signature of the program"""
    if noise not in ("normal", "rademacher"):
        raise EngineError(f"noise: expected 'normal' or 'rademacher', got {noise!r}")
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
    if not 0.0 <= momentum < 1.0:
        raise EngineError(f"momentum: expected a value in [0, 1), got {momentum!r}")
    for name, v in (("q", q), ("b", b), ("seq_len", seq_len)):
        if int(v) < 1:
            raise EngineError(f"{name} must be a positive integer, got {v}")
    sig = Signature(kind, int(n_choices), int(n_target or 0))
    problems = sig.problems(seq_len)
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
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise ProgramFileError(f"{side}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("engine") != engine:
        raise ProgramFileError(f"{side}: not the metadata of a zotune {engine} program")
    if meta.get("format") != FORMAT_VERSION:
        raise ProgramFileError(
            f"{side}: metadata format {meta.get('format')}, this zotune reads "
            f"format {FORMAT_VERSION}; re-export the program"
        )
    return meta


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
