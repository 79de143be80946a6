"""The ExecuTorch runtime side: a loaded training program (`PteProgram`), whose methods the
stock runtime executes. The host-side checks, evaluation chunks and state conversions it shares
with every runtime are in `program.py`; the training loop drives it through `ProgramEngine`."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch

from zotune.engines.export_common import EngineError, ProgramFileError  # noqa: F401
from zotune.engines.program import ProgramEngine, TrainingProgram

ENGINE = "executorch"
METHODS = ("train_step", "forward", "get_lora", "set_lora")
MOMENTUM_METHODS = ("get_momentum", "set_momentum")  # programs exported with momentum > 0
# The engine the training loop drives, the same for every runtime.
ExecuTorchEngine = ProgramEngine


def set_threads(n: int) -> None:
    """Threads of the runtime's shared threadpool (XNNPACK's; the default is one per core)."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(int(n))


class PteProgram(TrainingProgram):
    """An ExecuTorch training program: all its methods, one shared theta (and momentum buffer).

    The runtime's arena holds no meaningful initial value for theta: `load` always sets it."""

    ENGINE = ENGINE

    def __init__(self, path: Path, meta: dict, program, methods: dict):
        super().__init__(path, meta)
        self._program, self._methods = program, methods
        self.method_names = METHODS + (MOMENTUM_METHODS if self.momentum else ())

    @classmethod
    def _open(cls, path: Path, meta: dict, verify: bool) -> PteProgram:
        from executorch.runtime import Runtime

        with open(path, "rb") as f:  # the runtime crashes on some files without the identifier
            ident = f.read(8)[4:]
        if len(ident) < 4 or ident[:2] != b"ET":
            raise ProgramFileError(
                f"{path}: not an ExecuTorch program (no 'ET' file identifier); re-export it"
            )
        log = io.StringIO()  # the runtime logs why to stderr: it goes into the one error line
        try:
            with contextlib.redirect_stderr(log):
                program = Runtime.get().load_program(path)
        except Exception as e:  # the bindings raise RuntimeError/ValueError with an error code
            why = "; ".join([*log.getvalue().strip().splitlines(), str(e)])
            raise ProgramFileError(
                f"{path}: ExecuTorch cannot load this program ({why}); re-export it"
            ) from None
        sys.stderr.write(log.getvalue())
        self = cls(path, meta, program, {})
        missing = [m for m in self.method_names if m not in program.method_names]
        if missing:
            raise ProgramFileError(f"{path}: program has no method(s) {missing}")
        self._check_shapes()  # before loading: a mismatch must not cost the weight packing
        for name in self.method_names:  # load every method up front: they share one theta
            try:
                self._methods[name] = program.load_method(name)
            except Exception as e:  # noqa: BLE001
                raise ProgramFileError(
                    f"{path}: method '{name}' does not load ({e}); this "
                    "runtime may lack a kernel or backend it needs"
                ) from None
        return self

    def _check_shapes(self) -> None:
        # A method with a symbolic length records its upper bound, seq_len.
        bound = lambda d: self.seq_len if d == "T" else d  # noqa: E731
        shapes = {k: [[bound(d) for d in s] for s in v] for k, v in self.input_shapes().items()}
        want = {
            "train_step": [[1], [1], [1]] + shapes["step"],
            "forward": shapes["forward"],
            "set_lora": [[self.numel]],
        }
        if self.momentum:
            want["set_momentum"] = [[self.numel]]
        for name, shapes in want.items():
            meta = self._program.metadata(name)
            have = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
            if have != shapes:
                raise ProgramFileError(
                    f"{self.path}: method '{name}' takes inputs {have}, its "
                    f"metadata implies {shapes}: program and metadata do not "
                    "belong together; re-export it"
                )

    # -- runtime primitives ----------------------------------------------------------------

    def _step(self, seed, lr, eps, batch):
        loss, g = self._methods["train_step"].execute([seed, lr, eps, *batch])
        return float(loss), g

    def _forward(self, batch):
        return tuple(self._methods["forward"].execute(batch))

    def get_lora_flat(self) -> torch.Tensor:
        return self._methods["get_lora"].execute([])[0]

    def _set_lora_flat(self, flat):
        self._methods["set_lora"].execute([flat])

    def _get_momentum_flat(self):
        return self._methods["get_momentum"].execute([])[0]

    def _set_momentum_flat(self, flat):
        self._methods["set_momentum"].execute([flat])
