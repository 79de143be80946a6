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
from zotune.loss import trim_left_padding

EXPECTABLE = {
    "q",
    "b",
    "seq_len",
    "n_choices",
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

    def _forward(self, batch: list[torch.Tensor]) -> torch.Tensor:
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

    def input_shapes(self) -> dict[str, list[list[int]]]:
        """The batch inputs of the step and the forward, as the metadata implies them."""
        b, be, c = self.b, self.eval_batch, self.n_choices
        t = "T" if self.dynamic_length else self.seq_len
        return {"step": [[b, t]] * 3 + [[b, c], [b]], "forward": [[be, t]] * 3 + [[be, c]]}

    # -- the program -----------------------------------------------------------------------

    def _check_batch(self, batch, rows: int, n: int, what: str) -> list[torch.Tensor]:
        if len(batch) != n:
            raise EngineError(
                f"{what}: expected {n} batch tensors (input_ids, attention_mask, "
                f"position_ids, choice_ids{', labels' if n == 5 else ''}), "
                f"got {len(batch)}"
            )
        first = torch.as_tensor(batch[0]) if len(batch) else torch.zeros(0)
        length = first.shape[-1] if first.dim() == 2 else self.seq_len
        if not (self.dynamic_length and 2 <= length <= self.seq_len):
            length = self.seq_len
        shapes = [(rows, length)] * 3 + [(rows, self.n_choices), (rows,)]
        out = []
        for i, (t, shape) in enumerate(zip(batch, shapes)):
            t = torch.as_tensor(t)
            if tuple(t.shape) != shape:
                raise EngineError(
                    f"{what}: batch tensor {i} has shape {tuple(t.shape)}, this "
                    f"program was exported for {shape} (q={self.q}, b={self.b}, "
                    f"T={self.seq_len}, C={self.n_choices}, eval batch "
                    f"{self.eval_batch}); pad the batch or re-export"
                )
            out.append(t.to(torch.int64).contiguous())
        return out

    def train_step(self, seed: int, lr: float, eps: float, batch) -> tuple[float, torch.Tensor]:
        """One P-RGE step on the program's theta. -> (mean loss, g[q])"""
        return self._step(
            torch.tensor([int(seed)], dtype=torch.int64),
            torch.tensor([float(lr)], dtype=torch.float32),
            torch.tensor([float(eps)], dtype=torch.float32),
            self._check_batch(batch, self.b, 5, "train_step"),
        )

    def forward(self, input_ids, attention_mask, position_ids, choice_ids) -> torch.Tensor:
        """Choice logits [eval_batch, C] with the current theta."""
        return self._forward(
            self._check_batch(
                (input_ids, attention_mask, position_ids, choice_ids), self.eval_batch, 4, "forward"
            )
        )

    def scores(self, input_ids, attention_mask, position_ids, choice_ids) -> torch.Tensor:
        """Choice logits for any number of rows: chunks of the static eval batch, the last one
        padded with copies of its first row (rows are independent, padding is discarded)."""
        tensors = [torch.as_tensor(t) for t in (input_ids, attention_mask, position_ids, choice_ids)]
        rows, be = tensors[0].shape[0], self.eval_batch
        out = []
        for start in range(0, rows, be):
            chunk = [t[start : start + be] for t in tensors]
            n = chunk[0].shape[0]
            if n < be:
                chunk = [torch.cat([c, c[:1].expand(be - n, *c.shape[1:])]) for c in chunk]
            out.append(self.forward(*chunk)[:n])
        return torch.cat(out) if out else torch.zeros(0, self.n_choices)

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
        self.kind = "classification"

    def _trim(self, batch):
        # A program of symbolic length runs each batch without its all-padding columns, as the
        # eager engine does (exact under the attention mask); its length is at least 2.
        return trim_left_padding(tuple(batch), keep=2) if self.program.dynamic_length else batch

    def step(self, batch, seed: int, lr: float, eps: float):
        return self.program.train_step(seed, lr, eps, self._trim(batch))

    def scores(self, batch) -> tuple[torch.Tensor, ...]:
        return (self.program.scores(*self._trim(batch)[:4]),)

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
