"""One loaded model, engine and tokenised task per process, shared by every client it serves.

Flower's simulation runs many virtual clients in a few long-lived worker processes; loading the
weights per client would cost seconds each time. The cache is keyed by the model and everything
that shapes the engine (adapter, estimator), so a worker serving both modes keeps both."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass

import torch

from zotune.adapters.theta import ThetaLayout
from zotune.config import Config
from zotune.engines.eager import EagerEngine
from zotune.federated.partition import partition
from zotune.train.loop import Splits


@dataclass
class Workspace:
    engine: EagerEngine
    splits: Splits
    initial: dict[str, torch.Tensor]  # engine.state() before any step: the global start

    @property
    def layout(self) -> ThetaLayout:
        return self.engine.params.layout

    @property
    def params(self) -> list[torch.Tensor]:
        return self.engine.params.tensors()

    @property
    def velocity(self) -> list[torch.Tensor] | None:
        return self.engine.velocity

    def theta(self) -> torch.Tensor:
        """The trained tensors as one fp32 vector, a copy. -> [N]"""
        return self.layout.gather(self.params, torch.float32)

    def flat_state(self, with_velocity: bool = True) -> dict[str, torch.Tensor]:
        """What a client needs to take over the global state: theta [N], plus the momentum
        velocity [N] when there is one."""
        out = {"theta": self.theta()}
        if with_velocity and self.velocity is not None:
            out["velocity"] = self.layout.gather(self.velocity, torch.float32)
        return out


_CACHE: dict[str, Workspace] = {}
_SHARDS: dict[str, list[list[int]]] = {}


def engine_config(cfg: Config, first_order: bool) -> Config:
    """The config a client's engine runs: fedavg clients backprop with optim.optimizer."""
    cfg = copy.deepcopy(cfg)
    if first_order:
        cfg.optim.estimator, cfg.optim.lr = "fo", cfg.federated.fedavg_lr
        cfg.optim.momentum, cfg.optim.normalize = 0.0, "none"
    return cfg


def workspace(cfg: Config, first_order: bool = False, role: str = "client") -> Workspace:
    """role: the server keeps its own engine, so a process that hosts both (a test, or a
    simulation worker beside the ServerApp) never mixes the global B with a client's."""
    from zotune.train.run import prepare

    cfg = engine_config(cfg, first_order)
    key = json.dumps(
        [
            role,
            cfg.model.name,
            asdict(cfg.model),
            asdict(cfg.data),
            asdict(cfg.adapter),
            cfg.optim.estimator,
            cfg.optim.q,
            cfg.optim.noise,
            cfg.optim.momentum,
            cfg.optim.optimizer,
            cfg.optim.dual,
        ],
        sort_keys=True,
        default=str,
    )
    if key not in _CACHE:
        model, _, splits = prepare(cfg)
        engine = EagerEngine(model, cfg, splits.kind)
        _CACHE[key] = Workspace(engine, splits, engine.state())
    return _CACHE[key]


def shard(cfg: Config, splits: Splits, client: int, clients: int) -> list[int]:
    """The train indices of one client (federated.partition over `clients` partitions)."""
    f = cfg.federated
    key = json.dumps(
        [asdict(cfg.data), f.partition, f.alpha, f.partition_seed, clients, cfg.optim.batch_size],
        sort_keys=True,
    )
    if key not in _SHARDS:
        labels = (
            splits.train.labels.tolist() if splits.train.labels is not None else [None] * len(splits.train)
        )
        _SHARDS[key] = partition(
            labels, clients, f.partition, f.alpha, f.partition_seed, min_size=cfg.optim.batch_size
        )
    return _SHARDS[key][client]
