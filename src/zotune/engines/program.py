"""The host side of an exported training program, shared by every runtime that executes one.

A training program (ExecuTorch .pte, ONNX Runtime .onnx) holds one flat theta [N] (and a momentum
buffer [N] with momentum > 0) and offers one step and one forward. `TrainingProgram` does
everything that does not depend on the runtime: it checks the file against its sidecar metadata
and the caller's configuration before the runtime sees it, checks batch shapes, pads evaluation
chunks, and converts between the flat layout and dicts of named tensors. A runtime subclass
implements the primitives (`_open`, `_step`, `_forward`, the four state accessors).
`ProgramEngine` puts any loaded program behind the surface the training loop drives for every
engine (step, scores, state / load_state, adapter_state). `load_program` picks the runtime
from the engine the metadata names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zotune.adapters.theta import LayoutError
from zotune.data.choice import pad_choices
from zotune.engines.base import MOMENTUM, PARAM, part, prefixed
from zotune.engines.export_common import (
    EngineError,
    ProgramFileError,
    check_expected,
    check_layout,
    program_layout,
    read_engine,
    read_sidecar,
    verify_file,
)
from zotune.engines.signature import Signature
from zotune.loss import trim_left_padding

EXPECTABLE = {
    "q",
    "b",
    "seq_len",
    "n_choices",
    "n_target",
    "eval_batch",
    "numel",
    "noise",
    "dual",
    "momentum",
    "quantize",
    "model",
    "model_type",
    "loss",
    "dtype",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TrainingProgram:
    """A loaded training program. theta is always initialised when the program is loaded:
    zeros for LoRA-FA, or the `lora` given to `load`; the momentum buffer starts at zero."""

    ENGINE = ""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.q, self.b, self.seq_len = meta["q"], meta["b"], meta["seq_len"]
        self.n_choices, self.eval_batch, self.numel = (meta["n_choices"], meta["eval_batch"], meta["numel"])
        self.sig = Signature.of_meta(meta)  # the loss it computes and its batch (signature.py)
        self.layout = program_layout(path, meta)
        self.dtype = DTYPES.get(meta.get("dtype", "float32"), torch.float32)
        self.momentum = float(meta["momentum"])
        # A program with a symbolic length takes any T <= seq_len (ONNX); others exactly seq_len.
        self.dynamic_length = bool(meta.get("dynamic_length", False))

    # -- runtime primitives ----------------------------------------------------------------

    @classmethod
    def _open(cls, path: Path, meta: dict, verify: bool) -> TrainingProgram:
        """Load the program into the runtime and check its inputs against `meta`."""
        raise NotImplementedError

    def _step(
        self, seed: torch.Tensor, lr: torch.Tensor, eps: torch.Tensor, batch: list[torch.Tensor]
    ) -> tuple[float, torch.Tensor]:
        raise NotImplementedError

    def _forward(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def get_lora_flat(self) -> torch.Tensor:
        """theta [N], a copy."""
        raise NotImplementedError

    def _set_lora_flat(self, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def _get_momentum_flat(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_momentum_flat(self, flat: torch.Tensor) -> None:
        raise NotImplementedError

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(
        cls, path: str | Path, *, adapter=None, lora=None, verify: bool = True, **expect
    ) -> TrainingProgram:
        """Open a program written by zotune export.

        adapter: if given, its layout (names, shapes, offsets, rank, alpha) must match.
        lora: initial theta (dict name -> tensor, or flat [N]); default zeros.
        expect: fields that must match the program's metadata, e.g. q=4, b=4, seq_len=64.
        verify: check size and sha256 of the file against its metadata (reads the whole file)."""
        unknown = sorted(set(expect) - EXPECTABLE)
        if unknown:
            raise TypeError(f"{cls.__name__}.load: unknown fields {unknown} (known: {sorted(EXPECTABLE)})")
        path = Path(path)
        meta = read_sidecar(path, cls.ENGINE)
        if verify:
            verify_file(path, meta)
        check_expected(path, meta, expect)
        if adapter is not None:
            check_layout(path, program_layout(path, meta), adapter)
        self = cls._open(path, meta, verify)
        if lora is None:
            if meta.get("init") not in (None, "zeros"):
                raise EngineError(
                    f"{path}: the trained tensors did not start at zero when this "
                    "program was exported: pass their values as lora="
                )
            lora = torch.zeros(self.numel, dtype=self.dtype)
        self.set_lora(lora)
        if self.momentum:
            self.set_momentum(torch.zeros(self.numel, dtype=self.dtype))
        return self

    def input_shapes(self) -> dict[str, list[list]]:
        """The batch inputs of the step and the forward, as the metadata implies them."""
        t = "T" if self.dynamic_length else self.seq_len
        return {
            "step": [list(s) for s in self.sig.shapes(self.b, t)],
            "forward": [list(s) for s in self.sig.shapes(self.eval_batch, t, forward=True)],
        }

    # -- the program -----------------------------------------------------------------------

    def _check_batch(self, batch, rows: int, forward: bool, what: str) -> list[torch.Tensor]:
        names = self.sig.forward_inputs if forward else self.sig.step_inputs
        if len(batch) != len(names):
            raise EngineError(
                f"{what}: expected {len(names)} batch tensors ({', '.join(names)}), got {len(batch)}"
            )
        tensors = [torch.as_tensor(t) for t in batch]
        if self.sig.kind == "choice":  # examples with fewer choices: masked spare rows
            tensors = pad_choices(tensors, self.sig.n_choices)
        length = tensors[0].shape[-1] if tensors[0].dim() == self.sig.length_dim + 1 else self.seq_len
        if not (self.dynamic_length and self.sig.min_length <= length <= self.seq_len):
            length = self.seq_len
        out = []
        for i, (name, t, shape) in enumerate(zip(names, tensors, self.sig.shapes(rows, length, forward))):
            if tuple(t.shape) != shape:
                raise EngineError(
                    f"{what}: batch tensor {i} ({name}) has shape {tuple(t.shape)}, this "
                    f"program was exported for {shape} (q={self.q}, b={self.b}, "
                    f"T={self.seq_len}, C={self.n_choices}, L={self.sig.n_target}, eval batch "
                    f"{self.eval_batch}); pad the batch or re-export"
                )
            out.append(t.to(self.sig.dtype(name)).contiguous())
        return out

    def train_step(self, seed: int, lr: float, eps: float, batch) -> tuple[float, torch.Tensor]:
        """One P-RGE step on the program's theta. -> (mean loss, g[q])"""
        return self._step(
            torch.tensor([int(seed)], dtype=torch.int64),
            torch.tensor([float(lr)], dtype=torch.float32),
            torch.tensor([float(eps)], dtype=torch.float32),
            self._check_batch(batch, self.b, False, "train_step"),
        )

    def forward(self, *batch):
        """The evaluation method on eval_batch rows with the current theta: choice logits
        (classification) or choice scores (choice) [eval_batch, C]; generation programs return
        (nll sum, token count), [eval_batch] each."""
        return _one(self._forward(self._check_batch(batch, self.eval_batch, True, "forward")))

    def score_rows(self, *batch) -> tuple[torch.Tensor, ...]:
        """The evaluation method's outputs for any number of rows: chunks of the static eval
        batch, the last one padded with copies of its first row (rows are independent, padding
        is discarded)."""
        tensors = [torch.as_tensor(t) for t in batch]
        rows, be = tensors[0].shape[0], self.eval_batch
        parts = []
        for start in range(0, rows, be):
            chunk = [t[start : start + be] for t in tensors]
            n = chunk[0].shape[0]
            if n < be:
                chunk = [torch.cat([c, c[:1].expand(be - n, *c.shape[1:])]) for c in chunk]
            out = self._forward(self._check_batch(chunk, be, True, "forward"))
            parts.append([o[:n] for o in out])
        if not parts:
            width = () if self.sig.kind == "generation" else (self.n_choices,)
            return tuple(torch.zeros(0, *width) for _ in self.sig.forward_outputs)
        return tuple(torch.cat(p) for p in zip(*parts))

    def scores(self, *batch):
        """score_rows, unpacked like `forward`."""
        return _one(self.score_rows(*batch))

    def get_lora(self) -> dict[str, torch.Tensor]:
        """The trained tensors, unflattened with the program's layout."""
        return self.layout.split(self.get_lora_flat())

    def _flat(self, values, what: str) -> torch.Tensor:
        """A dict name -> tensor (extra keys ignored) or a flat tensor -> [N] in the program's
        layout and dtype."""
        if isinstance(values, dict):
            try:
                return self.layout.gather(values, self.dtype)
            except LayoutError as e:
                raise EngineError(f"{what}: {e}") from None
        flat = torch.as_tensor(values).detach().to(self.dtype).reshape(-1)
        if flat.numel() != self.numel:
            raise EngineError(f"{what}: {flat.numel()} values, the program holds {self.numel}")
        return flat

    def set_lora(self, lora) -> None:
        """Set theta from a dict name -> tensor (extra keys ignored) or a flat [N] tensor."""
        flat = self._flat(lora, "set_lora")
        if not bool(torch.isfinite(flat).all()):
            raise EngineError("set_lora: values are not all finite")
        self._set_lora_flat(flat.contiguous())

    def get_momentum(self) -> dict[str, torch.Tensor]:
        """The momentum buffer, unflattened like theta ({} without momentum)."""
        if not self.momentum:
            return {}
        return self.layout.split(self._get_momentum_flat())

    def set_momentum(self, velocity) -> None:
        """Set the momentum buffer from a dict name -> tensor or a flat [N] tensor."""
        if not self.momentum:
            raise EngineError(f"{self.path}: this program was exported without momentum")
        self._set_momentum_flat(self._flat(velocity, "set_momentum").contiguous())


class ProgramEngine:
    """A loaded program of any runtime behind the engine contract (engines/base.py) the training
    loop drives.

    frozen: tensors the program does not hold but an adapter file needs (LoRA-FA's A matrices,
    e.g. `adapter.state()` of the eager adapter the program was exported from)."""

    def __init__(self, program: TrainingProgram, frozen: dict[str, torch.Tensor] | None = None):
        self.program, self.frozen = program, dict(frozen or {})
        self.name = program.ENGINE
        self.kind = program.sig.kind

    def _trim(self, batch):
        # A program of symbolic length runs each batch without its all-padding columns, as the
        # eager engine does (exact under the attention mask); its length is at least 2, and
        # more than the target positions.
        sig = self.program.sig
        return trim_left_padding(tuple(batch), keep=sig.min_length) if self.program.dynamic_length else batch

    def step(self, batch, seed: int, lr: float, eps: float):
        return self.program.train_step(seed, lr, eps, self._trim(batch))

    def scores(self, batch) -> tuple[torch.Tensor, ...]:
        return self.program.score_rows(*self._trim(batch)[: len(self.program.sig.forward_inputs)])

    def adapter_state(self) -> dict[str, torch.Tensor]:
        out = {k: v.clone() for k, v in self.frozen.items()}
        out.update(self.program.get_lora())
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The same keys as EagerEngine.state: param.<name> and momentum.<name>."""
        out = prefixed(self.program.get_lora(), PARAM)
        out.update(prefixed(self.program.get_momentum(), MOMENTUM))
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.program.set_lora(part(tensors, PARAM))
        if self.program.momentum:
            self.program.set_momentum(part(tensors, MOMENTUM))


def _one(outputs: tuple):
    return outputs[0] if len(outputs) == 1 else outputs


def runtime(engine: str):
    """-> (program class, set_threads function) of the runtime that executes `engine` programs."""
    if engine == "executorch":
        from zotune.engines.pte import PteProgram, set_threads

        return PteProgram, set_threads
    if engine == "onnx":
        from zotune.engines.ort import OrtProgram, set_threads

        return OrtProgram, set_threads
    raise ProgramFileError(f"unknown program engine '{engine}' (expected executorch or onnx)")


def load_program(path: str | Path, **kwargs) -> TrainingProgram:
    """Open an exported program with the runtime its metadata names (or its suffix implies)."""
    cls, _ = runtime(read_engine(path))
    return cls.load(path, **kwargs)
