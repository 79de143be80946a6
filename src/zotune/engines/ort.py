"""The ONNX Runtime side: the two InferenceSessions of an exported ONNX program with theta kept inside
ONNX Runtime (`OrtPair`), and the loaded training program (`OrtProgram`) the training loop
drives through `ProgramEngine`.

The step graph is stateless (theta in, new theta out). Between steps theta lives in two
ONNX Runtime-owned buffers (OrtValues) bound with I/O binding: step k reads buffer k % 2 and
writes buffer (k + 1) % 2, so the N values never pass through numpy or torch; only the seed,
lr, eps, the batch, the loss and g[q] cross the boundary. The evaluation InferenceSession binds whichever
buffer is current as its theta input. The momentum buffer is double-buffered the same way.
The base weights are inputs of both graphs too (onnx_weights.py): one copy, read from the
program's weights file once and bound to both sessions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zotune.engines.export_common import EngineError, ProgramFileError, verify_file
from zotune.engines.onnx import ENGINE, eval_names, eval_path, step_names
from zotune.engines.onnx_weights import PREFIX, bound_values, load_weights, weights_path
from zotune.engines.program import TrainingProgram
from zotune.engines.signature import Signature

_THREADS: dict[str, int | None] = {"intra": None}


def set_threads(n: int) -> None:
    """Intra-op threads of the InferenceSessions created from now on (default: one per core)."""
    _THREADS["intra"] = int(n)


def inference_session(source, threads: int | None = None):
    """A CPU InferenceSession of a model file path or serialized bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    threads = threads or _THREADS["intra"]
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: load-time notes are not the user's business
    return ort.InferenceSession(
        source if isinstance(source, bytes) else str(source), opts, providers=["CPUExecutionProvider"]
    )


def _ortvalue(shape: list[int]):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)


class OrtPair:
    """Step and forward InferenceSessions with theta (and velocity) double-buffered in ONNX Runtime."""

    def __init__(
        self,
        step_source,
        forward_source,
        momentum: bool,
        sig: Signature,
        threads: int | None = None,
        check=None,
        weights: dict[str, np.ndarray] | None = None,
    ):
        self.step = inference_session(step_source, threads)
        self.fwd = inference_session(forward_source, threads)
        if check is not None:  # before binding: a graph of another shape must fail clearly
            check(self.step, self.fwd)
        self._arrays = weights or {}  # the memory behind the bound weights: kept alive here
        self.weights = bound_values(self._arrays)
        self.momentum = momentum
        self.inputs, self.outputs = step_names(1.0 if momentum else 0.0, sig)
        self.batch_names = sig.step_inputs
        self.eval_inputs, self.eval_outputs = eval_names(sig)
        n = self.step.get_inputs()[0].shape[0]
        q = self.step.get_outputs()[-1].shape[0]
        if not isinstance(n, int) or not isinstance(q, int):
            raise ProgramFileError("the step graph has no static theta / g shape")
        self.numel, self.q = n, q
        self.theta = [_ortvalue([n]), _ortvalue([n])]
        self.velocity = [_ortvalue([n]), _ortvalue([n])] if momentum else None
        self.loss, self.g = _ortvalue([]), _ortvalue([q])
        self.cur = 0
        self._bindings = [self._binding(k) for k in (0, 1)]

    def _binding(self, k: int):
        io = self.step.io_binding()
        io.bind_ortvalue_input("theta", self.theta[k])
        io.bind_ortvalue_output("new_theta", self.theta[1 - k])
        if self.momentum:
            io.bind_ortvalue_input("velocity", self.velocity[k])
            io.bind_ortvalue_output("new_velocity", self.velocity[1 - k])
        io.bind_ortvalue_output("loss", self.loss)
        io.bind_ortvalue_output("g", self.g)
        self._bind_weights(io, self.step)
        return io

    def _bind_weights(self, io, sess) -> None:
        for i in sess.get_inputs():
            if i.name.startswith(PREFIX):
                io.bind_ortvalue_input(i.name, self.weights[i.name])

    def run_step(self, seed, lr, eps, batch) -> tuple[float, torch.Tensor]:
        """One step from the current buffers into the others, which then become current."""
        io = self._bindings[self.cur]
        arrays = [
            np.ascontiguousarray(torch.as_tensor(t).numpy()) for t in (seed, lr, eps, *batch)
        ]  # alive until the run returns
        for name, arr in zip(("seed", "lr", "eps", *self.batch_names), arrays):
            io.bind_cpu_input(name, arr)
        self.step.run_with_iobinding(io)
        self.cur = 1 - self.cur
        return float(self.loss.numpy()), torch.from_numpy(np.array(self.g.numpy()))

    def run_forward(self, batch) -> tuple[torch.Tensor, ...]:
        io = self.fwd.io_binding()
        io.bind_ortvalue_input("theta", self.theta[self.cur])
        self._bind_weights(io, self.fwd)
        arrays = [np.ascontiguousarray(torch.as_tensor(t).numpy()) for t in batch]
        for name, arr in zip(self.eval_inputs[1:], arrays):
            io.bind_cpu_input(name, arr)
        for name in self.eval_outputs:
            io.bind_output(name, "cpu")
        self.fwd.run_with_iobinding(io)
        return tuple(torch.from_numpy(np.array(v.numpy())) for v in io.get_outputs())

    def get_theta(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.theta[self.cur].numpy()))

    def set_theta(self, flat: torch.Tensor) -> None:
        self.theta[self.cur].update_inplace(np.ascontiguousarray(flat.numpy(), np.float32))

    def get_velocity(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.velocity[self.cur].numpy()))

    def set_velocity(self, flat: torch.Tensor) -> None:
        self.velocity[self.cur].update_inplace(np.ascontiguousarray(flat.numpy(), np.float32))

    def check_run(self, theta, velocity, seed, lr, eps, batch, eval_in) -> dict:
        """What parity.parity_metrics compares: state set, read back, one forward and
        one step from it."""
        self.set_theta(theta)
        if velocity is not None:
            self.set_velocity(velocity)
        got = {"get": self.get_theta(), "logits": self.run_forward(eval_in)}
        got["loss"], got["g"] = self.run_step(seed, lr, eps, batch)
        got["theta"] = self.get_theta()
        if velocity is not None:
            got["velocity"] = self.get_velocity()
        return got


class OrtProgram(TrainingProgram):
    """An ONNX training program (step file + evaluation file) loaded into ONNX Runtime."""

    ENGINE = ENGINE

    def __init__(self, path: Path, meta: dict, pair: OrtPair):
        super().__init__(path, meta)
        self.pair = pair

    @classmethod
    def _open(cls, path: Path, meta: dict, verify: bool) -> OrtProgram:
        fwd = eval_path(path)
        graph = meta.get("graphs", {}).get("forward", {})
        if not fwd.is_file():
            raise ProgramFileError(
                f"{path}: its evaluation program {fwd.name} is missing (export writes both files)"
            )
        if verify:
            verify_file(fwd, graph)
        self = cls(path, meta, None)
        self._weights = _read_weights(path, meta, verify)
        try:
            self.pair = OrtPair(
                path, fwd, bool(self.momentum), self.sig, check=self._check_shapes, weights=self._weights
            )
        except ProgramFileError:
            raise
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / ...
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ProgramFileError(
                f"{path}: ONNX Runtime cannot load this program ({msg}); re-export it"
            ) from None
        return self

    def _check_shapes(self, step, fwd) -> None:
        n, shapes = self.numel, self.input_shapes()
        inputs, _ = step_names(self.momentum, self.sig)
        state = [[n], [n]] if self.momentum else [[n]]
        want = {
            "step": (step, inputs, state + [[1], [1], [1]] + shapes["step"]),
            "forward": (fwd, eval_names(self.sig)[0], [[n]] + shapes["forward"]),
        }
        for graph, (sess, names, dims) in want.items():
            have = [(i.name, list(i.shape)) for i in sess.get_inputs()]
            lifted = [(a, b) for a, b in have if a.startswith(PREFIX)]
            have = [(a, b) for a, b in have if not a.startswith(PREFIX)]
            if have != [(a, list(b)) for a, b in zip(names, dims)]:
                raise ProgramFileError(
                    f"{self.path}: the {graph} graph takes inputs {have}, its "
                    f"metadata implies {list(zip(names, dims))}: program and "
                    "metadata do not belong together; re-export it"
                )
            for name, shape in lifted:
                a = self._weights.get(name)
                if a is None or list(a.shape) != shape:
                    raise ProgramFileError(
                        f"{self.path}: the {graph} graph takes weight {name}{shape}, which its weights "
                        f"file {weights_path(self.path).name} does not hold; re-export it"
                    )
        g = list(step.get_outputs()[-1].shape)
        if g != [self.q]:
            raise ProgramFileError(
                f"{self.path}: the step graph returns g{g}, its metadata "
                f"says q={self.q}: program and metadata do not belong "
                "together; re-export it"
            )

    # -- runtime primitives ----------------------------------------------------------------

    def _step(self, seed, lr, eps, batch):
        return self.pair.run_step(seed, lr, eps, batch)

    def _forward(self, batch):
        return self.pair.run_forward(batch)

    def get_lora_flat(self) -> torch.Tensor:
        return self.pair.get_theta()

    def _set_lora_flat(self, flat):
        self.pair.set_theta(flat)

    def _get_momentum_flat(self):
        return self.pair.get_velocity()

    def _set_momentum_flat(self, flat):
        if flat.dtype != torch.float32:
            raise EngineError("set_momentum: the ONNX program holds float32 values")
        self.pair.set_velocity(flat)


def _read_weights(path: Path, meta: dict, verify: bool) -> dict[str, np.ndarray]:
    """The program's lifted base weights (none for a program whose graphs hold their own)."""
    info = meta.get("weights")
    if info is None:
        return {}
    file = weights_path(path)
    if not file.is_file():
        raise ProgramFileError(f"{path}: its weights file {file.name} is missing (export writes it)")
    if verify:
        verify_file(file, info)
    from zotune.errors import reading

    with reading(file, "a safetensors weights file"):
        return load_weights(file)
