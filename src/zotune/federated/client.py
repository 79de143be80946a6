"""The Flower ClientApp: a device that keeps its data shard and its copy of the global adapter.

zo mode, one round:
  1. reach the global B: replay the records the server sent onto the copy kept in the node's
     context.state (or load the adapter the server sent instead);
  2. keep that as the new copy (position = base + records), then run local P-RGE steps on the
     shard with the seeds the server assigned;
  3. answer with (seeds, g), the shard's example count and the mean loss: a few hundred bytes.
The local steps never touch the kept copy: the client's own steps reach it through the global
log, weighted like everyone else's, in the next round.

fedavg mode: load the global theta, run first-order steps, answer with the new theta.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from zotune.config import Config
from zotune.estimators.zo import update_from_seed
from zotune.federated import protocol as P
from zotune.federated.workspace import Workspace, shard, workspace
from zotune.loss import batch_tensors
from zotune.rng import step_seed
from zotune.train.loop import batch_indices
from zotune.train.scale import StepScale

# The context.state records this client keeps between rounds (one key space for all record types).
STATE, POS = "zotune.global", "zotune.pos"


def _load(ws: Workspace, record) -> None:
    """theta [N] (and velocity [N], when the record and the engine have one) into the engine."""
    ws.layout.scatter(P.tensor(record, "theta"), ws.params)
    if ws.velocity is not None and "velocity" in record:
        ws.layout.scatter(P.tensor(record, "velocity"), ws.velocity)


def _restore(ws: Workspace, state: RecordDict) -> int | None:
    """Load the kept copy of the global state into the engine. -> its log position, or None
    when this client keeps none."""
    if POS not in state.config_records:
        return None
    _load(ws, state.array_records[STATE])
    return int(state.config_records[POS]["pos"])


def _keep(ws: Workspace, state: RecordDict, pos: int) -> None:
    state.array_records[STATE] = P.arrays(**ws.flat_state())
    state.config_records[POS] = ConfigRecord({"pos": pos})


def _reset(ws: Workspace) -> None:
    ws.engine.load_state(ws.initial)


def catch_up(cfg: Config, ws: Workspace, content: RecordDict, state: RecordDict) -> int | str:
    """Bring the engine to the global state of this round. -> the new position, or a status
    string when the client cannot (it lost the state the records build on)."""
    o = cfg.optim
    if "adapter" in content.array_records:
        _reset(ws)  # momentum-free runs send no velocity: it stays zero
        _load(ws, content.array_records["adapter"])
        return int(content.config_records["round"]["base"])
    base, records = P.read_records(content.config_records["records"], o.q)
    pos = _restore(ws, state)
    if pos is None:
        if base != 0:
            return f"out_of_sync: no kept state, records start at {base}"
        _reset(ws)
        pos = 0
    if pos < base:
        return f"out_of_sync: kept state at {pos}, records start at {base}"
    for rec in records[pos - base :]:  # the client may already hold a prefix
        update_from_seed(
            ws.layout,
            ws.params,
            torch.tensor([rec["seed"]], dtype=torch.int64),
            torch.tensor(rec["g"], dtype=torch.float32),
            rec["lr"],
            o.noise,
            o.momentum,
            ws.velocity,
        )
    return base + len(records)


def my_shard(cfg: Config, ws: Workspace, node_config) -> tuple[int, list[int]]:
    """-> (partition id, its train indices). The SuperNode's node config names the partition
    (`partition-id`, `num-partitions`; the simulation sets both)."""
    part = int(node_config.get("partition-id", 0))
    parts = int(node_config.get("num-partitions", cfg.federated.clients))
    return part, shard(cfg, ws.splits, part, parts)


def local_batches(cfg: Config, ws: Workspace, node_config, round_: int):
    """The shard's batches of this round's local steps (a seeded permutation per epoch of the
    shard, as the centralised trainer draws from the whole split)."""
    part, idx = my_shard(cfg, ws, node_config)
    L, b = cfg.federated.local_steps, cfg.optim.batch_size
    for t in range(L):
        pick = batch_indices(len(idx), b, round_ * L + t, step_seed(cfg.train.seed, part))
        yield batch_tensors(ws.splits.train.index(torch.tensor(idx)[pick]), ws.splits.kind)


def train_zo(cfg: Config, content: RecordDict, context: Context) -> RecordDict:
    ws = workspace(cfg)
    r = content.config_records["round"]
    status = catch_up(cfg, ws, content, context.state)
    if isinstance(status, str):
        return RecordDict({"reply": ConfigRecord({"status": status})})
    _keep(ws, context.state, status)
    scale = StepScale(cfg.optim.normalize, cfg.optim.rms_decay)
    scale.load_state({"ema": r["scale_ema"], "seen": r["scale_seen"]})
    seeds, lrs = [int(s) for s in r["seeds"]], list(r["lr"])
    g_all, losses = [], []
    batches = local_batches(cfg, ws, context.node_config, int(r["round"]))
    for seed, lr_schedule, batch in zip(seeds, lrs, batches):
        loss, g = ws.engine.step(batch, seed, scale.lr(lr_schedule), cfg.optim.eps)
        scale.update(g)
        g_all.extend(float(x) for x in g)
        losses.append(loss)
    count = len(my_shard(cfg, ws, context.node_config)[1])
    return RecordDict(
        {"reply": P.config(status="ok", seeds=seeds, g=g_all, count=count, loss=sum(losses) / len(losses))}
    )


def train_fedavg(cfg: Config, content: RecordDict, context: Context) -> RecordDict:
    ws = workspace(cfg, first_order=True)
    r = content.config_records["round"]
    _reset(ws)  # also empties the optimizer's moments: each round's local optimizer starts fresh
    ws.layout.scatter(P.tensor(content.array_records["adapter"], "theta"), ws.params)
    losses = []
    batches = local_batches(cfg, ws, context.node_config, int(r["round"]))
    for lr, batch in zip(list(r["lr"]), batches):
        loss, _ = ws.engine.step(batch, 0, lr, cfg.optim.eps)
        losses.append(loss)
    count = len(my_shard(cfg, ws, context.node_config)[1])
    return RecordDict(
        {
            "reply": P.config(status="ok", count=count, loss=sum(losses) / len(losses)),
            "theta": P.arrays(theta=ws.theta()),
        }
    )


def client_app(cfg: Config | None = None) -> ClientApp:
    """The ClientApp; with no cfg it reads the config file named in the run config (`config`,
    plus `overrides`), as Flower's deployment runs it."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        c = cfg or config_from_run(context.run_config)
        if c.train.threads:
            torch.set_num_threads(c.train.threads)
        fn = train_fedavg if c.federated.mode == "fedavg" else train_zo
        return Message(fn(c, message.content, context), reply_to=message)

    return app


def config_from_run(run_config) -> Config:
    from zotune.config import load_config

    overrides = str(run_config.get("overrides", "")).split()
    return load_config(str(run_config["config"]), overrides)


app = client_app()
