"""What the server and its clients put in Flower messages, and the checks on what comes back.

Down (server -> client, zo mode), one ConfigRecord "round" and either
  - "records": the global replay records the client has not seen: seeds [n], lr [n], g [n*q]
    (the log's lines from position `base`), or
  - "adapter": an ArrayRecord with the global trained tensors (theta [N]) and, with momentum,
    the velocity [N], for a client that is new or too far behind.
Up (client -> server): ConfigRecord "reply" with status, the seeds it stepped with, its g
[local_steps*q], its example count and its mean training loss. fedavg mode sends theta both ways.

Bytes are the length of the content's protobuf encoding (what Flower serialises; the message
envelope and gRPC framing come on top, a few dozen bytes)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from zotune.checks import all_finite
from zotune.rng import step_seed


def nbytes(content: RecordDict) -> int:
    return recorddict_to_proto(content).ByteSize()


def client_seeds(run_seed: int, round_: int, slot: int, slots: int, local_steps: int) -> list[int]:
    """The seeds of one client's local steps in one round. Each (round, slot, step) is its own
    counter below 2^32, and step_seed is a bijection of the counter for a fixed run seed, so no
    two steps of the federation share a seed."""
    base = (round_ * slots + slot) * local_steps
    return [step_seed(run_seed, base + t) for t in range(local_steps)]


def arrays(**named: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in named.items()})


def tensor(record: ArrayRecord, key: str) -> torch.Tensor:
    return torch.from_numpy(np.array(record[key].numpy(), copy=True))


def config(**values) -> ConfigRecord:
    """A ConfigRecord without empty lists (protobuf cannot type them; absent means empty)."""
    return ConfigRecord({k: v for k, v in values.items() if not (isinstance(v, list) and not v)})


def records_content(records: list[dict], base: int) -> ConfigRecord:
    """Global log lines [base, base + n) as three flat lists."""
    return config(
        base=base,
        n=len(records),
        seeds=[int(r["seed"]) for r in records],
        lr=[float(r["lr"]) for r in records],
        g=[float(x) for r in records for x in r["g"]],
    )


def read_records(rec: ConfigRecord, q: int) -> tuple[int, list[dict]]:
    """-> (base, [{seed, g, lr}, ...]) from records_content's encoding."""
    n = int(rec["n"])
    seeds, lrs, g = list(rec.get("seeds", [])), list(rec.get("lr", [])), list(rec.get("g", []))
    return int(rec["base"]), [{"seed": seeds[i], "lr": lrs[i], "g": g[i * q : (i + 1) * q]} for i in range(n)]


class Rejected(Exception):
    """A client reply that must not touch the global state; the message says why."""


def check_count(reply: ConfigRecord, max_count: int) -> int:
    count = reply.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= max_count:
        raise Rejected(f"example count {count!r} is not an integer in [1, {max_count}]")
    return count


def check_zo_reply(
    reply: ConfigRecord, seeds: list[int], q: int, max_abs_g: float, max_count: int
) -> tuple[list[list[float]], int]:
    """-> (g per step, example count) of a valid zeroth-order reply; raises Rejected."""
    status = reply.get("status", "")
    if status != "ok":
        raise Rejected(f"client status '{status}'")
    got = [int(s) for s in reply.get("seeds", [])]
    if got != seeds:
        raise Rejected(f"seeds {got[:4]}... are not the {len(seeds)} seeds assigned {seeds[:4]}...")
    g = list(reply.get("g", []))
    if len(g) != len(seeds) * q or not all(isinstance(x, float) for x in g):
        raise Rejected(f"{len(g)} values of g, expected {len(seeds)} steps x q={q} floats")
    if not all_finite(g):
        raise Rejected("g is not finite")
    for x in g:
        if abs(x) > max_abs_g:
            raise Rejected(f"|g| = {abs(x):.3g} exceeds federated.max_abs_g = {max_abs_g:g}")
    count = check_count(reply, max_count)
    return [g[t * q : (t + 1) * q] for t in range(len(seeds))], count


def check_theta(content: RecordDict, numel: int, max_count: int) -> tuple[torch.Tensor, int]:
    """-> (theta [N], example count) of a valid fedavg reply; raises Rejected."""
    reply = content.config_records.get("reply")
    if reply is None or reply.get("status") != "ok":
        raise Rejected(f"client status '{reply.get('status') if reply else None}'")
    if "theta" not in content.array_records or "theta" not in content.array_records["theta"]:
        raise Rejected("no theta in the reply")
    theta = tensor(content.array_records["theta"], "theta")
    if theta.shape != (numel,) or theta.dtype != torch.float32:
        raise Rejected(f"theta of shape {tuple(theta.shape)} {theta.dtype}, expected ({numel},) float32")
    if not all_finite(theta):
        raise Rejected("theta is not finite")
    return theta, check_count(reply, max_count)
