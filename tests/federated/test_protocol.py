"""The seed-and-scalar protocol through the real ServerApp loop and ClientApp, in process."""

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from grid import InProcessGrid

from conftest import tiny_config
from zotune.adapters.peft_io import load_peft
from zotune.federated import protocol as P
from zotune.federated.client import POS, STATE, client_app
from zotune.federated.server import serve
from zotune.federated.workspace import workspace
from zotune.replay import read_replay_log, replay_lora
from zotune.train.run import replay


def fed_config(tiny_folder, cls_jsonl, out, **fed):
    cfg = tiny_config(tiny_folder, cls_jsonl, out)
    cfg.federated.clients, cfg.federated.rounds, cfg.federated.local_steps = 3, 2, 2
    cfg.federated.wait_clients_s = 0.5  # some tests connect fewer nodes than seed slots
    for k, v in fed.items():
        setattr(cfg.federated, k, v)
    return cfg


def steps(run_dir):
    return [
        r
        for r in (json.loads(x) for x in (run_dir / "replay.jsonl").read_text().splitlines())
        if r["type"] == "step"
    ]


def rounds(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def global_theta(cfg):
    return workspace(cfg, role="server").theta()


def test_rounds_replay_exactly_and_clients_hold_the_global_state(tmp_path, tiny_folder, cls_jsonl):
    cfg = fed_config(tiny_folder, cls_jsonl, tmp_path / "run", rounds=3)
    app = client_app(cfg)
    grid = InProcessGrid({11: app, 22: app, 33: app})
    summary = serve(grid, cfg)
    run = tmp_path / "run"
    log = steps(run)
    assert len(log) == 3 * 3 * 2  # rounds x clients x local steps
    assert len({s["seed"] for s in log}) == len(log)  # no two steps share a seed
    replay(str(run / "replay.jsonl"), str(tmp_path / "rebuilt"))
    _, served = load_peft(run / "adapter")
    _, rebuilt = load_peft(tmp_path / "rebuilt")
    assert all(torch.equal(served[k], rebuilt[k]) for k in served)
    assert max(float(v.abs().max()) for v in served.values()) > 0
    # Each client keeps the global state at the start of the last round, bit for bit.
    header, records = read_replay_log(run / "replay.jsonl")
    for ctx in grid.contexts.values():
        pos = int(ctx.state.config_records[POS]["pos"])
        assert pos == 2 * 3 * 2
        state = replay_lora(header, records[:pos])
        want = workspace(cfg).layout.gather(state)
        assert torch.equal(P.tensor(ctx.state.array_records[STATE], "theta"), want)
    # Seeds and scalars only: a round's upload is a few hundred bytes, its download grows
    # with the records a client missed, far below the adapter.
    lines = rounds(run)
    assert all(b["up"] < 1024 for r in lines for b in r["bytes"])
    assert all(b["choice"] == "records" and b["down"] < b["down_other"] for r in lines for b in r["bytes"])
    assert summary["bytes_up_per_client_round"] < 1024 and summary["test"]["accuracy"] >= 0


@pytest.mark.parametrize("server_lr", [1.0, 3.0])
def test_weighted_records_equal_fedavg_of_client_deltas(tmp_path, tiny_folder, cls_jsonl, server_lr):
    """server_lr 1 is FedAvg; 3 (the clients of the round) moves B by the clients' summed deltas."""
    cfg = fed_config(
        tiny_folder,
        cls_jsonl,
        tmp_path / "run",
        rounds=1,
        clients=3,
        partition="dirichlet",
        alpha=1.0,
        server_lr=server_lr,
    )
    app = client_app(cfg)
    local = {}

    def capture(node):
        def run(message, context):
            reply = app(message, context)
            local[node] = (workspace(cfg).theta(), reply.content.config_records["reply"]["count"])
            return reply

        return run

    grid = InProcessGrid({n: capture(n) for n in (5, 6, 7)})
    serve(grid, cfg)
    counts = [c for _, c in local.values()]
    assert len(set(counts)) > 1  # unequal shards: the weights matter
    total = sum(counts)
    fedavg = sum((c / total) * theta for theta, c in local.values())  # every client began at 0
    assert torch.allclose(global_theta(cfg), server_lr * fedavg, atol=1e-7, rtol=1e-5)
    assert float(fedavg.abs().max()) > 1e-4


class Hostile:
    """A client that answers like the protocol, with one field poisoned."""

    def __init__(self, app, poison):
        self.app, self.poison = app, poison

    def __call__(self, message, context):
        r = message.content.config_records["round"]
        seeds = [int(s) for s in r["seeds"]]
        reply = {"status": "ok", "seeds": seeds, "g": [0.5] * (len(seeds) * 2), "count": 20, "loss": 0.7}
        if self.poison == "crash":
            raise RuntimeError("device lost power")
        self.poison(reply)
        return Message(RecordDict({"reply": ConfigRecord(reply)}), reply_to=message)


def nan_g(r):
    r["g"][1] = math.nan


def huge_g(r):
    r["g"][0] = 1e9


def wrong_seeds(r):
    r["seeds"] = [s + 1 for s in r["seeds"]]


def no_examples(r):
    r["count"] = 0


def test_hostile_and_crashing_clients_change_nothing(tmp_path, tiny_folder, cls_jsonl):
    def run(name, hostile):
        cfg = fed_config(tiny_folder, cls_jsonl, tmp_path / name, rounds=2, clients=7, min_fraction=0.2)
        app = client_app(cfg)
        nodes = {1: app, 2: app}  # the honest ones hold slots 0 and 1 in both runs
        nodes.update({3 + i: Hostile(app, p) for i, p in enumerate(hostile)})
        grid = InProcessGrid(nodes, partitions=2)
        serve(grid, cfg)
        return cfg, global_theta(cfg)

    poisons = [nan_g, huge_g, wrong_seeds, no_examples, "crash"]
    cfg, attacked = run("attacked", poisons)
    _, clean = run("clean", [])
    assert torch.equal(attacked, clean)
    assert [(s["seed"], s["g"], s["lr"]) for s in steps(tmp_path / "attacked")] == [
        (s["seed"], s["g"], s["lr"]) for s in steps(tmp_path / "clean")
    ]
    dropped = rounds(tmp_path / "attacked")[0]["dropped"]
    assert set(dropped) == {"2", "3", "4", "5", "6"}
    assert "not finite" in dropped["2"] and "max_abs_g" in dropped["3"]
    assert "seeds" in dropped["4"] and "count" in dropped["5"]
    assert "device lost power" in dropped["6"]


def test_too_few_valid_replies_leave_the_round_unapplied(tmp_path, tiny_folder, cls_jsonl):
    cfg = fed_config(tiny_folder, cls_jsonl, tmp_path / "run", rounds=1, clients=4, min_fraction=0.5)
    app = client_app(cfg)
    grid = InProcessGrid(
        {1: app, 2: Hostile(app, nan_g), 3: Hostile(app, huge_g), 4: Hostile(app, "crash")}, partitions=1
    )
    serve(grid, cfg)
    (line,) = rounds(tmp_path / "run")
    assert line["applied"] is False and line["accepted"] == [] and len(line["dropped"]) == 3
    assert steps(tmp_path / "run") == []
    assert float(global_theta(cfg).abs().max()) == 0.0


def test_resume_continues_exactly(tmp_path, tiny_folder, cls_jsonl):
    def grid_for(cfg):
        app = client_app(cfg)
        return InProcessGrid({1: app, 2: app, 3: app})

    cfg = fed_config(tiny_folder, cls_jsonl, tmp_path / "straight", rounds=2)
    serve(grid_for(cfg), cfg)
    straight = global_theta(cfg)
    cfg = fed_config(tiny_folder, cls_jsonl, tmp_path / "resumed", rounds=2)
    grid = grid_for(cfg)
    assert serve(grid, cfg, stop_after=1) is None
    workspace(cfg, role="server").engine.load_state(workspace(cfg).initial)  # a fresh server
    serve(grid, cfg, resume=True)
    assert torch.equal(global_theta(cfg), straight)
    assert [s["g"] for s in steps(tmp_path / "resumed")] == [s["g"] for s in steps(tmp_path / "straight")]
    assert [r["round"] for r in rounds(tmp_path / "resumed")] == [0, 1]


def test_late_and_stateless_clients_get_the_adapter(tmp_path, tiny_folder, cls_jsonl):
    # fraction 1/3: one client per round, so the others fall behind; each round adds 2
    # records, more than the limit of 1.
    cfg = fed_config(
        tiny_folder, cls_jsonl, tmp_path / "run", rounds=4, fraction=0.34, min_fraction=1.0, catch_up_limit=1
    )
    app = client_app(cfg)
    grid = InProcessGrid({1: app, 2: app, 3: app})
    serve(grid, cfg)
    lines = rounds(tmp_path / "run")
    choices = [b["choice"] for r in lines for b in r["bytes"]]
    assert "adapter" in choices and "records" in choices
    for r in lines:
        assert r["applied"], r["dropped"]
        for b in r["bytes"]:
            if b["choice"] == "adapter":
                assert b["down"] > 4 * workspace(cfg).layout.numel
    replay(str(tmp_path / "run" / "replay.jsonl"), str(tmp_path / "rebuilt"))
    _, served = load_peft(tmp_path / "run" / "adapter")
    _, rebuilt = load_peft(tmp_path / "rebuilt")
    assert all(torch.equal(served[k], rebuilt[k]) for k in served)

    # A device that lost its state cannot build on records: it says so, is dropped once,
    # then receives the adapter and takes part again.
    cfg = fed_config(tiny_folder, cls_jsonl, tmp_path / "lost", rounds=4)
    app = client_app(cfg)
    grid = InProcessGrid({1: app, 2: app})

    def forgetful(message, context):
        if message.metadata.group_id == "2":  # synced at 2 records, now holding nothing
            context.state = RecordDict()
        return app(message, context)

    grid.apps[2] = forgetful
    serve(grid, cfg)
    lines = rounds(tmp_path / "lost")
    assert lines[2]["accepted"] == [0] and "out_of_sync" in lines[2]["dropped"]["1"]
    assert lines[3]["accepted"] == [0, 1]
    assert lines[3]["bytes"][1]["choice"] == "adapter"


def test_fedavg_mode_averages_first_order_clients(tmp_path, tiny_folder, cls_jsonl):
    cfg = fed_config(tiny_folder, cls_jsonl, tmp_path / "run", rounds=1, mode="fedavg", fedavg_lr=1e-2)
    app = client_app(cfg)
    local = {}

    def capture(node):
        def run(message, context):
            reply = app(message, context)
            local[node] = (
                P.tensor(reply.content.array_records["theta"], "theta"),
                reply.content.config_records["reply"]["count"],
            )
            return reply

        return run

    grid = InProcessGrid({n: capture(n) for n in (1, 2, 3)})
    summary = serve(grid, cfg)
    total = sum(c for _, c in local.values())
    want = sum((c / total) * t for t, c in local.values())
    assert torch.allclose(global_theta(cfg), want, atol=1e-7)
    assert float(want.abs().max()) > 0
    numel = workspace(cfg).layout.numel
    assert summary["bytes_up_per_client_round"] > 4 * numel  # the whole B each way
    assert not (tmp_path / "run" / "replay.jsonl").read_text().strip()  # nothing to replay


@pytest.mark.parametrize("mode", ["zo"])
def test_bad_federated_config_is_a_clear_error(mode):
    from zotune.config import load_config
    from zotune.errors import ConfigError

    with pytest.raises(ConfigError, match="federated.mode"):
        load_config(None, ["--federated.mode", "gossip"])
    with pytest.raises(ConfigError, match="federated.min_fraction"):
        load_config(None, ["--federated.min_fraction", "0"])
