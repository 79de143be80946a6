"""The ExecuTorch runtime side: a loaded training program (`PteProgram`) and the engine the
training loop drives (`ExecuTorchEngine`). Only the stock runtime executes the step; the host
checks files and shapes, and moves tensors in and out."""

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
    read_sidecar,
    verify_file,
)

ENGINE = "executorch"
METHODS = ("train_step", "forward", "get_lora", "set_lora")
MOMENTUM_METHODS = ("get_momentum", "set_momentum")  # programs exported with momentum > 0

_EXPECTABLE = {"q", "b", "seq_len", "n_choices", "eval_batch", "numel", "noise", "dual",
               "momentum", "quantize", "model", "model_type", "loss", "dtype"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def set_threads(n: int) -> None:
    """Threads of the runtime's shared threadpool (XNNPACK's; the default is one per core)."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    _unsafe_reset_threadpool(int(n))


class PteProgram:
    """A loaded training program: all its methods, one shared theta (and momentum buffer).

    theta is always initialised through set_lora when the program is loaded (the runtime's arena
    holds no meaningful initial value): zeros for LoRA-FA, or the `lora` given to `load`; the
    momentum buffer, if the program has one, starts at zero through set_momentum."""

    def __init__(self, path: Path, meta: dict, program, methods: dict):
        self.path, self.meta, self._program, self._methods = path, meta, program, methods
        self.q, self.b, self.seq_len = meta["q"], meta["b"], meta["seq_len"]
        self.n_choices, self.eval_batch, self.numel = (meta["n_choices"], meta["eval_batch"],
                                                       meta["numel"])
        self.layout = program_layout(path, meta)
        self.dtype = _DTYPES.get(meta.get("dtype", "float32"), torch.float32)
        self.momentum = float(meta["momentum"])
        self.method_names = METHODS + (MOMENTUM_METHODS if self.momentum else ())

    @classmethod
    def load(cls, path: str | Path, *, adapter=None, lora=None, verify: bool = True,
             **expect) -> PteProgram:
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
            check_layout(path, program_layout(path, meta), adapter)
        from executorch.runtime import Runtime

        try:
            program = Runtime.get().load_program(path)
        except Exception as e:  # the bindings raise RuntimeError/ValueError with an error code
            raise ProgramFileError(f"{path}: ExecuTorch cannot load this program ({e}); "
                                   "re-export it") from None
        self = cls(path, meta, program, {})
        missing = [m for m in self.method_names if m not in program.method_names]
        if missing:
            raise ProgramFileError(f"{path}: program has no method(s) {missing}")
        self._check_shapes()  # before loading: a mismatch must not cost the weight packing
        for name in self.method_names:  # load every method up front: they share one theta
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
        if self.momentum:
            self.set_momentum(torch.zeros(self.numel, dtype=self.dtype))
        return self

    def _check_shapes(self) -> None:
        want = {
            "train_step": [[1], [1], [1], [self.b, self.seq_len], [self.b, self.seq_len],
                           [self.b, self.seq_len], [self.b, self.n_choices], [self.b]],
            "forward": [[self.eval_batch, self.seq_len]] * 3 + [[self.eval_batch, self.n_choices]],
            "set_lora": [[self.numel]],
        }
        if self.momentum:
            want["set_momentum"] = [[self.numel]]
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
        self._methods["set_lora"].execute([flat.contiguous()])

    def get_momentum(self) -> dict[str, torch.Tensor]:
        """The momentum buffer, unflattened like theta ({} without momentum)."""
        if not self.momentum:
            return {}
        return self.layout.split(self._methods["get_momentum"].execute([])[0])

    def set_momentum(self, velocity) -> None:
        """Set the momentum buffer from a dict name -> tensor or a flat [N] tensor."""
        if not self.momentum:
            raise EngineError(f"{self.path}: this program was exported without momentum")
        self._methods["set_momentum"].execute([self._flat(velocity, "set_momentum").contiguous()])


class ExecuTorchEngine:
    """A loaded program behind the engine contract (engines/base.py) the training loop drives.

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
        """The same keys as EagerEngine.state: param.<name> and momentum.<name>."""
        out = prefixed(self.program.get_lora(), PARAM)
        out.update(prefixed(self.program.get_momentum(), MOMENTUM))
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.program.set_lora(part(tensors, PARAM))
        if self.program.momentum:
            self.program.set_momentum(part(tensors, MOMENTUM))
