"""`zotune federate`: the ServerApp and ClientApp in Flower's simulation engine on this machine:
federated.clients virtual SuperNodes, federated.parallel of them running at once in Ray worker
processes (one CPU each), each worker loading the model once for every client it serves."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from zotune.config import Config
from zotune.errors import ZotuneError


def federate(cfg: Config, resume: bool = False, stop_after: int | None = None) -> dict | None:
    from flwr.simulation import run_simulation

    from zotune.federated.client import client_app
    from zotune.federated.server import server_app

    f = cfg.federated
    run_dir = Path(cfg.train.out_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary_path.unlink()  # a summary left by a previous run must not pass for this one's
    # Ray workers import zotune by name: make the importing tree's source visible to them.
    src = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != src]
    )
    errors: list[BaseException] = []
    server = server_app(cfg, resume, stop_after, errors)
    run_simulation(
        server,
        client_app(cfg),
        num_supernodes=f.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": f.parallel, "num_gpus": 0, "logging_level": logging.WARNING},
        },
    )
    if errors:
        raise errors[0]
    if stop_after is not None and not summary_path.exists():
        return None
    if not summary_path.exists():
        raise ZotuneError(f"the federated run wrote no {summary_path}; see the log above")
    return json.loads(summary_path.read_text())


def traffic_table(run_dir: str | Path) -> str:
    """Bytes per client per round from metrics.jsonl, one line per round."""
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    out = [
        f"{'round':>5} {'clients':>7} {'up B/client':>12} {'down B/client':>14} "
        f"{'down choice':>12} {'test':>7} {'wall s':>7}"
    ]
    for r in (x for x in lines if x.get("type") == "round"):
        b = r["bytes"]
        up = sum(x["up"] for x in b) / max(1, len(b))
        down = sum(x["down"] for x in b) / max(1, len(b))
        choices = "/".join(sorted({x["choice"] for x in b}))
        test = r.get("test", {})
        score = f"{test['accuracy']:.3f}" if "accuracy" in test else (f"{test['loss']:.3f}" if test else "-")
        out.append(
            f"{r['round']:>5} {len(r['accepted']):>3}/{len(b):<3} {up:>12.0f} "
            f"{down:>14.0f} {choices:>12} {score:>7} {r['wall_s']:>7.1f}"
        )
    return "\n".join(out)
