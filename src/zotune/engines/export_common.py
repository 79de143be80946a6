"""What every exporter of the training step shares: the trained tensors as buffers, the flat layout
of theta, a check batch, the sidecar metadata and its hash, and atomic writes.

Exported programs carry the trained tensors as state (ExecuTorch: mutable buffers) or as an
input/output pair (ONNX). Either way the host talks to them through one flat vector theta of N
values laid out as `LoRAAdapter.trained` says (name, shape, offset), the same layout the hash RNG
draws z in.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from zotune.adapters.lora import TrainedTensor
from zotune.errors import ZotuneError

FORMAT_VERSION = 1


class EngineError(ZotuneError):
    """An exported program cannot be built or used (wrong inputs, unsupported options)."""


class ExportCheckError(EngineError):
    """The lowered program does not reproduce the eager step within tolerance (nothing written)."""


class ProgramFileError(EngineError):
    """An exported program file is missing, corrupted, or does not match what was asked for."""


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


class LiveTrainedTensor(TrainedTensor):
    """A TrainedTensor whose `.tensor` is looked up on its module at every access.

    torch.export (non-strict) swaps a module's buffers for fake tensors while it traces; a tensor
    reference cached before tracing would be captured as a constant (and its in-place update lost
    or rejected). Reading the attribute through the module sees whatever the module holds now."""

    def __init__(self, name: str, offset: int, module: nn.Module, attr: str):
        self.name, self.offset = name, offset
        self._module, self._attr = module, attr

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self._module, self._attr)

    @tensor.setter
    def tensor(self, value: torch.Tensor) -> None:
        setattr(self._module, self._attr, value)


def trained_to_buffers(adapter) -> list[str]:
    """Turn every trained tensor of the adapter into a registered buffer of the same name.

    torch.export does not allow mutating parameters; buffers written in place become mutable state
    of the exported program. The values are kept (the buffer shares the parameter's storage) and
    the entries of `adapter.trained` become LiveTrainedTensor views of the buffers, so the adapter,
    eager PRGEStep and `state()`/`load_state()` keep working on the same tensors, eagerly and
    under tracing. Idempotent. Returns the trained tensor names (relative to the model)."""
    names = []
    for i, t in enumerate(adapter.trained):
        module, attr = _owner(adapter.model, t.name)
        if attr in module._parameters:
            value = module._parameters.pop(attr).detach()
            module.register_buffer(attr, value, persistent=True)
        if not isinstance(t, LiveTrainedTensor):
            adapter.trained[i] = LiveTrainedTensor(t.name, t.offset, module, attr)
        names.append(t.name)
    return names


class ChoiceForward(nn.Module):
    """Choice logits with the current theta (the evaluation program). The adapted layers run in
    replica mode with a single replica, so theta enters only through bmm (never as a linear
    weight a backend could pack or quantize)."""

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


def check_options(adapter, loss, q, b, seq_len, n_choices, noise, momentum, what: str) -> None:
    """What every exporter of the step supports, checked before any tracing."""
    if noise not in ("normal", "rademacher"):
        raise EngineError(f"noise: expected 'normal' or 'rademacher', got {noise!r}")
    if not hasattr(adapter, "layers"):
        raise EngineError(f"the {what} engine exports LoRA / LoRA-FA adapters only "
                          "(full-parameter training has no compact trained state)")
    if getattr(loss, "kind", None) != "classification" or getattr(loss, "via_head_module", False):
        raise EngineError(f"the {what} engine exports the classification loss "
                          "(label-word logits at the last position)")
    if not 0.0 <= momentum < 1.0:
        raise EngineError(f"momentum: expected a value in [0, 1), got {momentum!r}")
    for name, v in (("q", q), ("b", b), ("seq_len", seq_len), ("n_choices", n_choices)):
        if int(v) < 1 or (name == "n_choices" and v < 2):
            raise EngineError(f"{name} must be a positive integer (n_choices >= 2), got {v}")


def layout(adapter) -> dict:
    """The adapter layout an exported program was built for (JSON-ready)."""
    return {
        "kind": "lora" if getattr(adapter, "train_a", False) else "lora-fa",
        "rank": getattr(adapter, "rank", None),
        "alpha": getattr(adapter, "alpha", None),
        "targets": list(getattr(adapter, "target_patterns", [])),
        "layers": list(getattr(adapter, "layers", {})),
        "numel": adapter.numel,
        "tensors": [{"name": t.name, "shape": list(t.tensor.shape), "offset": t.offset,
                     "numel": t.tensor.numel()} for t in adapter.trained],
    }


def flat_trained(adapter) -> torch.Tensor:
    """theta: the trained tensors flattened and concatenated in layout order. -> [N] (a copy)"""
    return torch.cat([t.tensor.detach().reshape(-1) for t in adapter.trained]).clone()


@torch.no_grad()
def load_flat(adapter, flat: torch.Tensor) -> None:
    for t in adapter.trained:
        t.tensor.copy_(flat[t.offset: t.offset + t.tensor.numel()].reshape(t.tensor.shape))


def unflatten(flat: torch.Tensor, tensors: list[dict]) -> dict[str, torch.Tensor]:
    return {d["name"]: flat[d["offset"]: d["offset"] + d["numel"]].reshape(d["shape"]).clone()
            for d in tensors}


def flatten(state: dict[str, torch.Tensor], tensors: list[dict],
            dtype=torch.float32) -> torch.Tensor:
    """A dict name -> tensor (extra keys such as lora_A of LoRA-FA are ignored) -> theta [N]."""
    parts = []
    for d in tensors:
        if d["name"] not in state:
            raise EngineError(f"adapter state has no tensor '{d['name']}'")
        v = torch.as_tensor(state[d["name"]])
        if list(v.shape) != list(d["shape"]):
            raise EngineError(f"adapter tensor '{d['name']}' has shape {list(v.shape)}, "
                              f"the program expects {d['shape']}")
        parts.append(v.detach().to(dtype).reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def check_batch(vocab_size: int, b: int, seq_len: int, n_choices: int,
                seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A deterministic classification batch of the static shapes (left padding on some rows),
    for tracing and for the parity check of a freshly lowered program."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (b, seq_len), generator=g, dtype=torch.int64)
    am = torch.ones(b, seq_len, dtype=torch.int64)
    for i in range(b):
        am[i, : (i * 3) % max(1, seq_len // 2)] = 0  # left padding of different lengths
    ids = ids.masked_fill(am == 0, 0)
    pos = (am.cumsum(1) - 1).clamp_min(0)
    choice = torch.stack([torch.randperm(vocab_size - 3, generator=g)[:n_choices] + 3
                          for _ in range(b)]).to(torch.int64)
    labels = torch.randint(0, n_choices, (b,), generator=g, dtype=torch.int64)
    return ids, am, pos, choice, labels


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, then os.replace: no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_sidecar(path: str | Path, engine: str) -> dict:
    """The metadata written beside an exported program, checked for presence and format."""
    path = Path(path)
    if not path.is_file():
        raise ProgramFileError(f"{path}: program file does not exist")
    side = sidecar_path(path)
    if not side.is_file():
        raise ProgramFileError(f"{path}: its metadata file {side.name} is missing "
                               "(export the program with zotune, which writes both)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise ProgramFileError(f"{side}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("engine") != engine:
        raise ProgramFileError(f"{side}: not the metadata of a zotune {engine} program")
    if meta.get("format") != FORMAT_VERSION:
        raise ProgramFileError(f"{side}: metadata format {meta.get('format')}, this zotune reads "
                               f"format {FORMAT_VERSION}; re-export the program")
    return meta


def verify_file(path: str | Path, meta: dict) -> None:
    """The program bytes are exactly the ones the metadata describes (size, then sha256)."""
    path = Path(path)
    size = path.stat().st_size
    if size != meta.get("size"):
        raise ProgramFileError(f"{path}: {size} bytes, its metadata says {meta.get('size')} "
                               "(truncated, corrupted or replaced; re-export it)")
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise ProgramFileError(f"{path}: sha256 {digest[:12]}... does not match its metadata "
                               f"({str(meta.get('sha256'))[:12]}...): corrupted or replaced; "
                               "re-export it")


def check_expected(path, meta: dict, expect: dict) -> None:
    """Fields the caller needs (q, b, seq_len, ...) against those the program was built with."""
    wrong = [f"{k}: program has {meta.get(k)!r}, expected {v!r}" for k, v in expect.items()
             if v is not None and meta.get(k) != v]
    if wrong:
        raise ProgramFileError(f"{path}: built for a different configuration ("
                               + "; ".join(wrong) + "); re-export it")


def check_layout(path, meta: dict, adapter) -> None:
    want = layout(adapter)
    have = meta.get("layout", {})
    for key in ("kind", "rank", "alpha", "numel"):
        if have.get(key) != want[key]:
            raise ProgramFileError(f"{path}: adapter {key} is {have.get(key)!r} in the program, "
                                   f"{want[key]!r} in this adapter; re-export it")
    if have.get("tensors") != want["tensors"]:
        names = {d["name"] for d in want["tensors"]} ^ {d["name"] for d in have.get("tensors", [])}
        detail = f" (differing tensors: {sorted(names)[:4]})" if names else " (shapes or offsets)"
        raise ProgramFileError(f"{path}: adapter layout differs from this adapter{detail}; "
                               "re-export it")


# ---------------------------------------------------------------------------------------------
# What every exporter reports and checks before it writes a program.

@dataclass
class ExportReport:
    path: str
    sidecar: str
    size: int
    sha256: str
    seconds: dict = field(default_factory=dict)  # export / lower / emit / check / total
    check: dict = field(default_factory=dict)  # max abs differences against eager
    tolerance: dict = field(default_factory=dict)  # metric -> max allowed (gated metrics only)
    portable_ops: dict = field(default_factory=dict)  # non-delegated ops per method (ExecuTorch)
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# Metrics every program is held to exactly (1e-5), whatever its arithmetic: set/get of theta,
# and the update (and momentum buffer) the program's own g implies.
EXACT = {"set_get": 1e-5, "update": 1e-5, "momentum": 1e-5}
# An fp32 program matches eager everywhere.
FP32 = {**EXACT, "forward": 1e-5, "loss": 1e-5, "loss_diff": 1e-5, "theta": 1e-5}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_values(theta: torch.Tensor, momentum: float, seed: int) -> tuple:
    """A nonzero theta [N] (and momentum buffer) for the parity check: at zero the LoRA-FA
    forward would not depend on theta at all."""
    dtype = theta.dtype
    theta_c = (torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed))
               * 0.02).to(dtype)
    velocity_c = (torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed + 1))
                  * 0.1).to(dtype) if momentum else None
    return theta_c, velocity_c


@torch.no_grad()
def parity_metrics(program: dict, step, adapter, loss, model, theta, velocity, seed_t, lr_t,
                   eps_t, batch, eval_in) -> dict:
    """Max abs differences between what a program computed from (theta, velocity) and eager
    PyTorch from the same state. program: {"get": theta read back after setting it, "logits":
    forward on eval_in, "loss", "g": one train step on batch, "theta" and (with momentum)
    "velocity": the state after it}. `step` is the eager PRGEStep (fused noise); the model's
    VELOCITY buffer is set to `velocity` here."""
    from zotune.estimators.prge import VELOCITY, flat_update
    from zotune.rng import noise as rng_noise

    load_flat(adapter, theta)
    if velocity is not None:
        getattr(model, VELOCITY).copy_(velocity)
    logits_eager = loss.logits(model, *eval_in)
    loss_eager, g_eager = step(seed_t, lr_t, eps_t, *batch)
    theta_eager = flat_trained(adapter)

    # The update the program's own g implies, computed in eager from the same z (the RNG is
    # bit-exact): checks the noise, the update and the momentum buffer whatever g came out.
    g_p = torch.as_tensor(program["g"])
    z = rng_noise(seed_t, 0, step.q * theta.numel(), step.noise, theta.dtype)
    z = z.reshape(step.q, -1)  # [q, N]
    v_expected = None if velocity is None else velocity.clone()
    theta_expected = flat_update(theta, z, g_p, lr_t, step.momentum, v_expected)
    extra = {}
    if velocity is not None:
        extra["momentum"] = max_diff(program["velocity"], v_expected)
    logits_p = torch.as_tensor(program["logits"])
    return {
        "set_get": max_diff(program["get"], theta),
        # Logits are compared relative to their scale (real LMs give logits of 10-30).
        "forward": max_diff(logits_p, logits_eager) / max(1.0, float(logits_eager.abs().max())),
        "loss": max_diff(torch.as_tensor(program["loss"]).reshape(()), loss_eager),
        # g = (l+ - l-) / (2 eps): compare the loss differences it comes from.
        "loss_diff": max_diff(g_p * 2 * eps_t, g_eager * 2 * eps_t),
        "theta": max_diff(program["theta"], theta_eager),
        "update": max_diff(program["theta"], theta_expected),
        **extra,
    }


def gate(check: dict, tol: dict, what: str, out_path) -> None:
    """Raise ExportCheckError naming every metric above its tolerance (NaN counts as above)."""
    bad = {k: v for k, v in check.items() if k in tol and not (v <= tol[k])}
    if bad:
        raise ExportCheckError(
            f"the {what} differs from eager PyTorch beyond tolerance: "
            + ", ".join(f"{k} {v:.3g} > {tol[k]:g}" for k, v in bad.items())
            + f"; nothing was written to {out_path}")


def read_engine(path: str | Path) -> str:
    """The engine named in a program's metadata (for picking the runtime that opens it)."""
    side = sidecar_path(path)
    try:
        engine = json.loads(side.read_text()).get("engine")
    except (OSError, ValueError, AttributeError):
        engine = None
    if engine:
        return str(engine)
    suffix = Path(path).suffix
    return {".pte": "executorch", ".onnx": "onnx"}.get(suffix, "executorch")
