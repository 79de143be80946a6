"""The Flower ServerApp: waits for the SuperNodes, runs the rounds over Flower's Grid, evaluates
the global adapter on the server's dev and test splits, and writes the run folder:

    replay.jsonl     header + every applied record (zo): `zotune replay` rebuilds the adapter
    metrics.jsonl    one line per round: clients, dropped replies and why, bytes, accuracy, time
    checkpoint/      global state after the last finished round (atomic): `--resume` goes on
    adapter/         the final global adapter, PEFT format
    summary.json     zero-shot and final scores, bytes per client per round
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from zotune.config import Config
from zotune.errors import ZotuneError
from zotune.eval import calibrated_accuracy, evaluate
from zotune.federated.coordinator import Coordinator, Outcome, Sent
from zotune.federated.workspace import workspace
from zotune.io import atomic_write_text
from zotune.train.logs import JsonlLog

log = logging.getLogger("zotune.federated")


def _scores(ws, cfg: Config) -> dict:
    out = {}
    for split in ("dev", "test"):
        result = evaluate(ws.engine, getattr(ws.splits, split), ws.splits.kind, cfg.train.eval_batch_size)
        out[split] = {k: v for k, v in result.items() if k != "logits"}
        out[f"{split}_logits"] = result.get("logits")
    return out


def zero_shot(ws, cfg: Config) -> dict:
    s = _scores(ws, cfg)
    out = {"dev": s["dev"], "test": s["test"]}
    if s["dev_logits"] is not None and s["dev_logits"].shape[1] == 2:
        threshold, acc = calibrated_accuracy(
            s["dev_logits"], ws.splits.dev.labels, s["test_logits"], ws.splits.test.labels
        )
        out["test_calibrated"] = {"accuracy": acc, "threshold": threshold}
    return out


def wait_for_nodes(grid: Grid, want: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not nodes:
        raise ZotuneError(f"no SuperNode connected within federated.wait_clients_s={timeout_s:g} s")
    return nodes


def exchange(grid: Grid, sent: list[Sent], round_: int, timeout_s: float) -> dict:
    """Send every message, wait for the replies. -> node -> content, or an error string."""
    messages = [
        Message(s.content, dst_node_id=s.node, message_type=MessageType.TRAIN, group_id=str(round_))
        for s in sent
    ]
    replies = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node = reply.metadata.src_node_id
        replies[node] = f"client failed: {reply.error.reason}" if reply.has_error() else reply.content
    return replies


def round_line(
    c: Coordinator, sent: list[Sent], replies: dict, out: Outcome, wall: float, scores: dict | None
) -> dict:
    from zotune.federated.protocol import nbytes

    traffic = [
        {
            "slot": s.slot,
            "down": s.down,
            "choice": s.choice,
            "down_other": s.down_other,
            "up": nbytes(replies[s.node]) if not isinstance(replies.get(s.node, ""), str) else 0,
        }
        for s in sent
    ]
    line = {
        "type": "round",
        "done": out.round + 1,
        "round": out.round,
        "applied": out.applied,
        "accepted": out.accepted,
        "dropped": {str(k): v for k, v in out.dropped.items()},
        "records": out.records,
        "log_len": c.log_len,
        "train_loss": out.loss,
        "bytes": traffic,
        "wall_s": wall,
    }
    if scores is not None:
        line.update(dev=scores["dev"], test=scores["test"])
    return line


def serve(grid: Grid, cfg: Config, resume: bool = False, stop_after: int | None = None) -> dict | None:
    """The server's whole run. -> the summary, or None when stopped after `stop_after` rounds."""
    from zotune.train.run import adapter_saver, replay_header

    f = cfg.federated
    run_dir = Path(cfg.train.out_dir)
    ws = workspace(cfg, role="server")
    header = {**replay_header(cfg, ws.engine.params), "federated": cfg.to_dict()["federated"]}
    c = Coordinator(cfg, ws, run_dir, header)
    c.start(resume)
    metrics = JsonlLog(run_dir / "metrics.jsonl")
    if resume:
        metrics.truncate(c.round)
        zs = json.loads((run_dir / "zero_shot.json").read_text())
    else:
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        metrics.reset()
        zs = zero_shot(ws, cfg)
        atomic_write_text(run_dir / "zero_shot.json", json.dumps(zs, indent=1))
        log.info("zero-shot: dev %s, test %s", zs["dev"], zs["test"])
    nodes = wait_for_nodes(grid, f.clients, f.wait_clients_s)
    done_now = 0
    while c.round < f.rounds:
        t0 = time.perf_counter()
        nodes = list(grid.get_node_ids()) or nodes
        sent = c.messages(nodes)
        replies = exchange(grid, sent, c.round, f.round_timeout_s)
        out = c.finish(sent, replies)
        wall = time.perf_counter() - t0
        last = c.round == f.rounds
        scores = _scores(ws, cfg) if (c.round % f.eval_every == 0 or last) else None
        line = round_line(c, sent, replies, out, wall, scores)
        metrics.write(line)
        for slot, why in out.dropped.items():
            log.warning("round %d: dropped client %d: %s", out.round, slot, why)
        log.info(
            "round %d: %s clients %s, %d records, test %s, %.1f s",
            out.round,
            "applied" if out.applied else "NOT applied (too few valid replies)",
            out.accepted,
            out.records,
            scores and scores["test"],
            wall,
        )
        done_now += 1
        if stop_after is not None and done_now >= stop_after and c.round < f.rounds:
            return None
    save = adapter_saver(cfg, ws.engine)
    adapter_dir = run_dir / "adapter"
    save(ws.engine.adapter_state(), adapter_dir)
    summary = summarize(cfg, zs, metrics.read(), adapter_dir)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def summarize(cfg: Config, zs: dict, lines: list[dict], adapter_dir: Path) -> dict:
    rounds = [r for r in lines if r.get("type") == "round"]
    evals = [r for r in rounds if "test" in r]
    traffic = [b for r in rounds for b in r["bytes"]]
    best = max(evals, key=lambda r: r["dev"].get("accuracy", -r["dev"].get("loss", 0)), default=None)

    def mean(key):
        vals = [b[key] for b in traffic]
        return sum(vals) / len(vals) if vals else 0.0

    return {
        "mode": cfg.federated.mode,
        "rounds": len(rounds),
        "zero_shot": zs,
        "test": evals[-1]["test"] if evals else None,
        "dev": evals[-1]["dev"] if evals else None,
        "best_dev_round": best and best["round"],
        "best_dev_test": best and best["test"],
        "bytes_up_per_client_round": mean("up"),
        "bytes_down_per_client_round": mean("down"),
        "max_bytes_up": max((b["up"] for b in traffic), default=0),
        "round_wall_s": [r["wall_s"] for r in rounds],
        "dropped": {str(r["round"]): r["dropped"] for r in rounds if r["dropped"]},
        "adapter": str(adapter_dir),
        "config": cfg.to_dict(),
    }


def server_app(
    cfg: Config | None = None, resume: bool = False, stop_after: int | None = None, errors: list | None = None
) -> ServerApp:
    """The ServerApp; with no cfg it reads the config named in the run config (`config`,
    `overrides`, `resume`), as Flower's deployment runs it. Exceptions are also appended to
    `errors`, for a caller whose runtime runs the app in another thread."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from zotune.federated.client import config_from_run

        c = cfg or config_from_run(context.run_config)
        if not log.handlers:  # zotune's round lines, without turning on Flower's debug logs
            log.addHandler(logging.StreamHandler())
            log.setLevel(logging.INFO)
        try:
            serve(grid, c, resume or bool(context.run_config.get("resume", False)), stop_after)
        except BaseException as e:
            if errors is not None:
                errors.append(e)
            raise

    return app


app = server_app()
