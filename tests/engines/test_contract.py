"""The engine contract (zotune.engines.base.Engine), one suite for every engine.

Each engine joins with one fixture that returns an `EngineCase`: how to make a fresh engine (theta
at its start value), its q, and optionally an eager engine it must agree with. Add the fixture's
name to CASES (and to PARITY when it has a reference) and the whole suite runs on it: step,
determinism, state keys, a bitwise resume through a real checkpoint, scores, PEFT naming of the
adapter state, and parity with eager. The distributed path joins as one rank of a real gloo group
(the equality of many ranks with one process is tests/train/test_distributed.py's); the federated
path as a server whose global adapter moves only by the clients' (seed, g) replies, carried in
Flower records and checked as the server checks them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from helpers import free_port, synthetic_batch
from zotune.adapters.peft_io import load_peft, save_peft
from zotune.config import Config
from zotune.engines.base import PARAM, PREFIXES, Engine, part
from zotune.engines.eager import EagerEngine, build_params
from zotune.engines.export_common import StepSpec
from zotune.models.tiny import make_tiny_model
from zotune.rng import step_seed
from zotune.train.checkpoint import load_checkpoint, save_checkpoint

Q, B, T, C = 2, 2, 12, 2
LR, EPS = 5e-2, 1e-2
STEPS = 3


@dataclass
class EngineCase:
    make: Callable[[], Engine]  # a fresh engine: same start state every call
    q: int  # length of g (0 for first-order)
    layers: list[str]  # the adapted layers, for the PEFT names of adapter_state
    reference: Callable[[], Engine] | None = None  # an eager engine it must agree with
    tol: float = 1e-5


def batch(i: int):
    return synthetic_batch(b=B, T=T, seed=i)


def config(estimator: str, momentum: float = 0.9) -> Config:
    cfg = Config()
    cfg.adapter.rank, cfg.adapter.alpha = 4, 8
    cfg.optim.estimator, cfg.optim.q, cfg.optim.batch_size = estimator, Q, B
    cfg.optim.momentum = momentum
    cfg.optim.lr = LR if estimator != "fo" else 1e-2
    return cfg


def eager(tokenizer, cfg: Config) -> Callable[[], EagerEngine]:
    def make():
        return EagerEngine(make_tiny_model("llama", tokenizer, seed=0), cfg, "classification")

    return make


def _layers(make) -> list[str]:
    return list(make().params.layers)


# -- one fixture per engine --------------------------------------------------------------------


@pytest.fixture
def eager_prge(tokenizer):
    make = eager(tokenizer, config("prge"))
    return EngineCase(make, Q, _layers(make))


@pytest.fixture
def eager_rge(tokenizer):
    # Sequential RGE computes the same g as P-RGE for the same seed.
    make = eager(tokenizer, config("rge"))
    return EngineCase(make, Q, _layers(make), reference=eager(tokenizer, config("prge")))


@pytest.fixture
def eager_fo(tokenizer):
    make = eager(tokenizer, config("fo", momentum=0.0))
    return EngineCase(make, 0, _layers(make))


@pytest.fixture(scope="module")
def _exported(tmp_path_factory, tokenizer):
    from zotune.engines.executorch import export_program
    from zotune.loss import ClassificationLoss

    cfg = config("prge")
    model = make_tiny_model("llama", tokenizer, seed=0)
    adapter = build_params(model, cfg)
    path = tmp_path_factory.mktemp("contract") / "step.pte"
    # Portable kernels keep the export quick; XNNPACK programs are checked in test_executorch.py.
    export_program(
        model,
        adapter,
        ClassificationLoss(),
        StepSpec(Q, B, T, C, eval_batch=B, momentum=cfg.optim.momentum),
        path,
        xnnpack=False,
    )
    return path, adapter.state(), list(adapter.layers), cfg


@pytest.fixture
def executorch_program(_exported, tokenizer):
    from zotune.engines.pte import ExecuTorchEngine, PteProgram

    path, frozen, layers, cfg = _exported

    def make():
        return ExecuTorchEngine(PteProgram.load(path), frozen)

    return EngineCase(make, Q, layers, reference=eager(tokenizer, cfg))


@pytest.fixture(scope="module")
def _exported_onnx(tmp_path_factory, tokenizer):
    from zotune.engines.onnx import export_program
    from zotune.loss import ClassificationLoss

    cfg = config("prge")
    model = make_tiny_model("llama", tokenizer, seed=0)
    adapter = build_params(model, cfg)
    path = tmp_path_factory.mktemp("contract-onnx") / "step.onnx"
    export_program(
        model,
        adapter,
        ClassificationLoss(),
        StepSpec(Q, B, T, C, eval_batch=B, momentum=cfg.optim.momentum),
        path,
        threads=1,
    )
    return path, adapter.state(), list(adapter.layers), cfg


@pytest.fixture
def onnx_program(_exported_onnx, tokenizer):
    from zotune.engines.ort import OrtProgram
    from zotune.engines.program import ProgramEngine

    path, frozen, layers, cfg = _exported_onnx

    def make():
        return ProgramEngine(OrtProgram.load(path), frozen)

    return EngineCase(make, Q, layers, reference=eager(tokenizer, cfg))


@pytest.fixture(scope="module")
def _ranks():
    """A one-rank gloo group on 127.0.0.1, as torchrun would set it up."""
    import os

    import torch.distributed as dist

    from zotune.train.distributed import Ranks

    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cfg = config("prge")
    cfg.train.parallel = "query"
    ranks = Ranks(cfg)
    yield ranks
    ranks.close()
    assert not dist.is_initialized()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def distributed_rank(_ranks, tokenizer):
    from zotune.train.distributed import ShardedEngine

    cfg = config("prge")

    def make():
        model = make_tiny_model("llama", tokenizer, seed=0)
        return ShardedEngine(EagerEngine(model, cfg, "classification", _ranks.step_options()), _ranks)

    return EngineCase(make, Q, _layers(eager(tokenizer, cfg)), reference=eager(tokenizer, cfg))


class FederatedServer:
    """The federated path as an engine: a client's eager engine takes the step; its reply (seed, g,
    count) goes through Flower's record encoding and the server's reply check, and the server moves
    its own global adapter by update_from_seed, as its aggregation of one client does. State,
    scores and the adapter are the server's."""

    name = "federated"
    kind = "classification"

    def __init__(self, make_engine, cfg: Config):
        self.client, self.server, self.cfg = make_engine(), make_engine(), cfg

    def step(self, batch, seed: int, lr: float, eps: float):
        from flwr.app import RecordDict
        from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

        from zotune.estimators.zo import update_from_seed
        from zotune.federated import protocol as P

        loss, g = self.client.step(batch, seed, lr, eps)
        sent = RecordDict({"reply": P.config(status="ok", seeds=[seed], g=[float(x) for x in g], count=B)})
        got = recorddict_from_proto(recorddict_to_proto(sent)).config_records["reply"]
        (g_steps,), _ = P.check_zo_reply(got, [seed], Q, max_abs_g=1e6, max_count=B)
        o, params, velocity = self.cfg.optim, self.server.params, self.server.velocity
        seed_t = torch.tensor([seed], dtype=torch.int64)
        g_t = torch.tensor(g_steps, dtype=torch.float32)
        update_from_seed(params.layout, params.tensors(), seed_t, g_t, lr, o.noise, o.momentum, velocity)
        return loss, g_t

    def scores(self, batch):
        return self.server.scores(batch)

    def state(self):
        return self.server.state()

    def load_state(self, tensors):
        self.server.load_state(tensors)
        self.client.load_state(tensors)  # a client catching up holds the global state

    def adapter_state(self):
        return self.server.adapter_state()


@pytest.fixture
def federated_server(tokenizer):
    cfg = config("prge")
    make = eager(tokenizer, cfg)
    return EngineCase(lambda: FederatedServer(make, cfg), Q, _layers(make), reference=make)


CASES = [
    "eager_prge",
    "eager_rge",
    "eager_fo",
    "executorch_program",
    "onnx_program",
    "distributed_rank",
    "federated_server",
]
PARITY = ["eager_rge", "executorch_program", "onnx_program", "distributed_rank", "federated_server"]


@pytest.fixture(params=CASES)
def case(request) -> EngineCase:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=PARITY)
def parity_case(request) -> EngineCase:
    return request.getfixturevalue(request.param)


# -- the suite ---------------------------------------------------------------------------------


def run_steps(engine, steps: range):
    return [engine.step(batch(i), step_seed(0, i), LR, EPS) for i in steps]


def test_is_an_engine(case):
    engine = case.make()
    assert isinstance(engine, Engine)
    assert isinstance(engine.name, str) and engine.kind in ("classification", "generation")


def test_step_changes_state_deterministically(case):
    a, b = case.make(), case.make()
    start = a.state()
    for (loss_a, g_a), (loss_b, g_b) in zip(run_steps(a, range(STEPS)), run_steps(b, range(STEPS))):
        assert isinstance(loss_a, float) and 0 < loss_a < 20
        assert g_a.shape == (case.q,) and bool(torch.isfinite(g_a).all())
        assert loss_a == loss_b and torch.equal(g_a, g_b)
    end, other = a.state(), b.state()
    assert end.keys() == other.keys() and set(part(end, PARAM)) == set(part(start, PARAM))
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith(PARAM))
    assert all(torch.equal(end[k], other[k]) for k in end)


def test_state_keys_use_the_checkpoint_prefixes(case):
    state = case.make().state()
    assert state and all(k.startswith(PREFIXES) for k in state)
    params = part(state, PARAM)
    assert params and all(name.rsplit(".", 1)[0] in case.layers for name in params)


def test_resume_through_a_checkpoint_is_bitwise(case, tmp_path):
    straight = case.make()
    want = run_steps(straight, range(STEPS))
    first = case.make()
    run_steps(first, range(1))
    save_checkpoint(tmp_path / "ckpt", first.state(), {"done": 1})
    del first
    resumed = case.make()
    tensors, meta = load_checkpoint(tmp_path / "ckpt")
    resumed.load_state(tensors)
    got = run_steps(resumed, range(meta["done"], STEPS))
    for (loss_w, g_w), (loss_g, g_g) in zip(want[1:], got):
        assert loss_w == loss_g and torch.equal(g_w, g_g)
    a, b = straight.state(), resumed.state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scores_of_any_row_count(case):
    engine = case.make()
    rows = synthetic_batch(b=2 * B + 1, T=T, seed=9)  # not a multiple of any batch size
    (logits,) = engine.scores(rows)
    assert logits.shape == (2 * B + 1, C) and bool(torch.isfinite(logits).all())
    assert torch.equal(engine.scores(rows)[0], logits)
    run_steps(engine, range(1))
    assert engine.scores(rows)[0].shape == logits.shape


def test_adapter_state_has_peft_names(case, tmp_path):
    engine = case.make()
    run_steps(engine, range(1))
    state = engine.adapter_state()
    assert set(state) == {f"{layer}.{k}" for layer in case.layers for k in ("lora_A", "lora_B")}
    save_peft(tmp_path / "adapter", state, case.layers, 4, 8, "tiny")
    config, loaded = load_peft(tmp_path / "adapter")
    assert config["peft_type"] == "LORA" and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_parity_with_eager(parity_case):
    engine, reference = parity_case.make(), parity_case.reference()
    tol = parity_case.tol
    for (loss, g), (loss_r, g_r) in zip(run_steps(engine, range(STEPS)), run_steps(reference, range(STEPS))):
        assert abs(loss - loss_r) <= tol
        assert float((g - g_r).abs().max()) * 2 * EPS <= tol  # g = (l+ - l-) / (2 eps)
    a, b = part(engine.state(), PARAM), part(reference.state(), PARAM)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= tol
    rows = synthetic_batch(b=B, T=T, seed=11)
    assert float((engine.scores(rows)[0] - reference.scores(rows)[0]).abs().max()) <= tol
