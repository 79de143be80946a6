"""The server's global state and round logic, apart from Flower's transport: what each sampled
client is sent, and how valid replies change the global adapter.

Global state: the trained tensors B (in an eval engine), the momentum velocity, the step scale
(optim.normalize), the replay log of every applied record, and what each client holds.

zo aggregation: client c with n_c examples gets weight w_c = eta_s * n_c / sum n, with eta_s the
server learning rate (federated.server_lr, 1 by default). Each of its records (seed, g, lr) is
applied to the global B as (seed, w_c * g, lr) with the same update rule replay uses, and
appended to the global log. A client's local delta from the round's start is
-sum_t lr_t * mean_i g_ti z_ti, linear in g, so applying every client's scaled records equals the
weighted average of the clients' deltas from the same start: FedAvg (exactly with momentum 0; with
momentum the velocity runs over the scaled records of the round, a server-side momentum), moved
eta_s times as far (FedOpt's server step). The lr
of each record is recomputed here from the round's schedule and step scale and the client's own
g, so a client cannot choose its step size.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import RecordDict

from zotune.checks import all_finite
from zotune.config import Config
from zotune.estimators.zo import update_from_seed
from zotune.federated import protocol as P
from zotune.federated.workspace import Workspace
from zotune.train.checkpoint import load_checkpoint, save_checkpoint
from zotune.train.logs import JsonlLog
from zotune.train.scale import StepScale
from zotune.train.schedule import lr_at


@dataclass
class Sent:
    """What the server sent one client in one round, kept to check the reply."""

    node: int
    slot: int
    seeds: list[int]
    lr: list[float]  # schedule lr of each local step
    base: int  # global log position the client reaches before its local steps
    content: RecordDict
    down: int  # bytes of the content actually sent
    choice: str  # "records" | "adapter"
    down_other: int | None = None  # bytes the other choice would have cost, when known


@dataclass
class Outcome:
    round: int
    applied: bool
    accepted: list[int] = field(default_factory=list)  # slots
    dropped: dict[int, str] = field(default_factory=dict)  # slot -> reason
    records: int = 0
    loss: float | None = None


class Coordinator:
    def __init__(self, cfg: Config, ws: Workspace, run_dir: Path, header: dict | None):
        self.cfg, self.ws, self.run_dir = cfg, ws, Path(run_dir)
        self.zo = cfg.federated.mode == "zo"
        self.header = header
        self.log = JsonlLog(self.run_dir / "replay.jsonl")
        self.ckpt = self.run_dir / "checkpoint"
        o = cfg.optim
        self.scale = StepScale(o.normalize if self.zo else "none", o.rms_decay)
        self.round, self.log_len = 0, 0
        self.clients: dict[str, dict] = {}  # str(node id) -> {"slot", "pos" (None: unknown)}

    # ------------------------------------------------------------------ state

    @property
    def velocity(self) -> list[torch.Tensor] | None:
        return self.ws.velocity if self.zo else None

    def start(self, resume: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            tensors, meta = load_checkpoint(self.ckpt)
            self.ws.engine.load_state(tensors)
            self.round, self.log_len = meta["round"], meta["log_len"]
            self.scale.load_state(meta["scale"])
            self.clients = meta["clients"]
            self.log.truncate(self.log_len)
            return
        self.ws.engine.load_state(self.ws.initial)
        self.log.reset()
        if self.zo:
            self.log.write({"type": "header", "done": 0, **self.header})
        self.checkpoint()

    def checkpoint(self) -> None:
        save_checkpoint(
            self.ckpt,
            self.ws.engine.state(),
            {
                "round": self.round,
                "log_len": self.log_len,
                "scale": self.scale.state(),
                "clients": self.clients,
            },
        )

    # ------------------------------------------------------------------ sending

    def sample(self, nodes: list[int]) -> list[int]:
        """This round's clients: a seeded sample of the connected nodes (federated.fraction),
        at most federated.clients of them hold a seed slot."""
        f = self.cfg.federated
        known = [n for n in sorted(nodes) if str(n) in self.clients]
        for n in sorted(nodes):
            if str(n) not in self.clients and len(self.clients) < f.clients:
                self.clients[str(n)] = {"slot": len(self.clients), "pos": None}
                known.append(n)
        k = max(1, round(f.fraction * len(known)))
        rng = random.Random(self.cfg.train.seed * 1_000_003 + self.round)
        return sorted(
            rng.sample(sorted(known), min(k, len(known))), key=lambda n: self.clients[str(n)]["slot"]
        )

    def schedule(self) -> list[float]:
        """The schedule lr of each local step of this round."""
        o, f = self.cfg.optim, self.cfg.federated
        lr = o.lr if self.zo else f.fedavg_lr
        L = f.local_steps
        return [
            lr_at(self.round * L + t, f.rounds * L, lr, o.schedule, o.warmup_steps, o.min_lr_ratio)
            for t in range(L)
        ]

    def messages(self, nodes: list[int]) -> list[Sent]:
        f = self.cfg.federated
        lrs = self.schedule()
        records = [r for r in self.log.read() if r.get("type") == "step"] if self.zo else []
        adapter = None
        out = []
        for node in self.sample(nodes):
            info = self.clients[str(node)]
            seeds = (
                P.client_seeds(self.cfg.train.seed, self.round, info["slot"], f.clients, f.local_steps)
                if self.zo
                else []
            )
            head = P.config(
                round=self.round,
                base=self.log_len,
                seeds=seeds,
                lr=lrs,
                scale_ema=float(self.scale.ema),
                scale_seen=int(self.scale.seen),
            )
            if adapter is None:
                adapter = RecordDict({"round": head, "adapter": P.arrays(**self.ws.flat_state(self.zo))})
            by_adapter = RecordDict({"round": head, "adapter": adapter["adapter"]})
            n_adapter = P.nbytes(by_adapter)
            if not self.zo:
                out.append(
                    Sent(node, info["slot"], seeds, lrs, self.log_len, by_adapter, n_adapter, "adapter")
                )
                continue
            pos = info["pos"]
            start = 0 if pos is None else pos
            if pos == -1 or self.log_len - start > f.catch_up_limit:
                out.append(
                    Sent(node, info["slot"], seeds, lrs, self.log_len, by_adapter, n_adapter, "adapter")
                )
                continue
            by_records = RecordDict(
                {"round": head, "records": P.records_content(records[start : self.log_len], start)}
            )
            out.append(
                Sent(
                    node,
                    info["slot"],
                    seeds,
                    lrs,
                    self.log_len,
                    by_records,
                    P.nbytes(by_records),
                    "records",
                    n_adapter,
                )
            )
        return out

    # ------------------------------------------------------------------ receiving

    def finish(self, sent: list[Sent], replies: dict[int, RecordDict | str]) -> Outcome:
        """Validate the replies (node -> content, or an error string) and, with enough valid
        ones, apply them. Invalid, failed or missing replies change nothing."""
        f = self.cfg.federated
        out = Outcome(self.round, applied=False)
        valid = []
        for s in sent:
            reply = replies.get(s.node, "no reply before federated.round_timeout_s")
            try:
                if isinstance(reply, str):
                    raise P.Rejected(reply)
                valid.append((s, *self._check(s, reply)))
            except P.Rejected as e:
                out.dropped[s.slot] = str(e)
                status = (
                    reply.config_records["reply"].get("status", "")
                    if not isinstance(reply, str) and "reply" in reply.config_records
                    else ""
                )
                if str(status).startswith("out_of_sync"):
                    self.clients[str(s.node)]["pos"] = -1  # next time: the adapter
        need = math.ceil(f.min_fraction * len(sent))
        if valid and len(valid) >= need:
            total = sum(count for _, _, count, _ in valid)
            out.records = self._apply_zo(valid, total) if self.zo else self._apply_fedavg(valid, total)
            out.applied = True
            out.accepted = [s.slot for s, *_ in valid]
            out.loss = sum(loss * count for _, _, count, loss in valid) / total
            for s, *_ in valid:
                self.clients[str(s.node)]["pos"] = s.base
        self.round += 1
        self.checkpoint()
        return out

    def _check(self, s: Sent, content: RecordDict):
        """-> (payload, count, loss) of a valid reply; raises Rejected."""
        f, q = self.cfg.federated, self.cfg.optim.q
        if "reply" not in content.config_records:
            raise P.Rejected("no reply record")
        reply = content.config_records["reply"]
        if self.zo:
            g, count = P.check_zo_reply(reply, s.seeds, q, f.max_abs_g, f.max_count)
            payload = g
        else:
            payload, count = P.check_theta(content, self.ws.layout.numel, f.max_count)
        loss = reply.get("loss")
        if not isinstance(loss, float) or not all_finite(loss):
            raise P.Rejected(f"loss {loss!r} is not a finite number")
        return payload, count, loss

    def _apply_zo(self, valid, total: int) -> int:
        o = self.cfg.optim
        start = self.scale.state()
        n = 0
        for s, g_steps, count, _ in valid:
            w = self.cfg.federated.server_lr * count / total
            local = StepScale(self.scale.kind, self.scale.decay)  # the client's lr rule
            local.load_state(start)
            for t, (seed, g) in enumerate(zip(s.seeds, g_steps)):
                lr = local.lr(s.lr[t])
                local.update(g)
                applied = torch.tensor([w * x for x in g], dtype=torch.float32)
                update_from_seed(
                    self.ws.layout,
                    self.ws.params,
                    torch.tensor([seed], dtype=torch.int64),
                    applied,
                    lr,
                    o.noise,
                    o.momentum,
                    self.velocity,
                )
                self.log.write(
                    {
                        "type": "step",
                        "done": self.log_len + 1,
                        "step": self.log_len,
                        "seed": seed,
                        "lr": lr,
                        "eps": o.eps,
                        "g": [float(x) for x in applied],
                        "round": self.round,
                        "slot": s.slot,
                        "weight": w,
                    }
                )
                self.log_len += 1
                n += 1
                self.scale.update(g)  # the global scale folds in the clients' own g
        return n

    def _apply_fedavg(self, valid, total: int) -> int:
        theta = torch.zeros_like(self.ws.theta())  # [N]
        for _, client_theta, count, _ in valid:  # slot order: the same sum every time
            theta += (count / total) * client_theta
        self.ws.layout.scatter(theta, self.ws.params)
        return len(valid)
