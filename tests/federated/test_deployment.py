"""Flower's deployment runtime for real: a SuperLink and two SuperNodes on 127.0.0.1 (insecure,
free ports), `flwr run` of apps/federated with a tiny model, then every process group stopped.

One round: each round starts a fresh `flwr-clientapp` process per SuperNode (torch and the model
loaded again), so a round costs seconds of start-up here. What later rounds add, catching up from
the records sent, is proven in process with messages through their protobuf encoding
(test_protocol.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from helpers import free_port
from zotune.adapters.peft_io import load_peft
from zotune.train.run import replay

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def test_superlink_two_supernodes(tmp_path, tiny_folder, cls_jsonl):
    run_dir = tmp_path / "run"
    cfg = {
        "model": {"name": tiny_folder},
        "data": {
            "task": f"jsonl:{cls_jsonl}",
            "train_size": 40,
            "dev_size": 16,
            "test_size": 16,
            "max_length": 16,
        },
        "adapter": {"rank": 4, "alpha": 8},
        "optim": {"q": 2, "batch_size": 2, "lr": 0.01},
        "train": {"eval_batch_size": 8, "out_dir": str(run_dir), "progress": False, "threads": 1},
        "federated": {
            "clients": 2,
            "rounds": 5,
            "local_steps": 2,
            "wait_clients_s": 60,
            "round_timeout_s": 120,
        },
    }
    cfg_path = tmp_path / "federated.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    home = tmp_path / "flwr"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
    }
    procs = []

    def start(name, *args):
        out = open(tmp_path / f"{name}.log", "w")
        procs.append(
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=env,
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--port",
            str(link),
            "--disable-runtime-dependency-installation",
        )
        wait_port(link, 60)
        for i in range(2):
            start(
                f"supernode{i}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={i} num-partitions=2",
            )
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(ROOT / "apps" / "federated"),
                "local",
                "--stream",
                "--run-config",
                f'config="{cfg_path}" overrides="--federated.rounds 1"',
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        deadline = time.monotonic() + 30  # the stream can end just before the file lands
        while not (run_dir / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        logs = "".join((tmp_path / f"{n}.log").read_text() for n in ("superlink", "supernode0", "supernode1"))
        assert (run_dir / "summary.json").exists(), run.stdout[-3000:] + logs[-3000:]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["mode"] == "zo"  # the override reached the apps
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in rounds] == [[0, 1]]  # both SuperNodes
    assert all(b["up"] < 1024 for r in rounds for b in r["bytes"])
    # 2 clients x 2 local steps records, and the log rebuilds the served adapter.
    replay(str(run_dir / "replay.jsonl"), str(tmp_path / "rebuilt"))
    _, served = load_peft(run_dir / "adapter")
    _, rebuilt = load_peft(tmp_path / "rebuilt")
    assert all(torch.equal(served[k], rebuilt[k]) for k in served)
    assert max(float(v.abs().max()) for k, v in served.items() if k.endswith("lora_B")) > 0
