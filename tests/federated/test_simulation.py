"""`zotune federate` in Flower's simulation engine (Ray workers), with a tiny model.

Kept to the least that exercises the Ray wiring (one worker serving both virtual clients, one
round): the round logic, catch-up from records and a process serving several clients are proven
in process (test_protocol.py), and Ray's start-up is most of this test's time."""

import json

import yaml

from zotune.cli import main


def test_federate_command_runs_the_simulation(tmp_path, tiny_folder, cls_jsonl, capsys):
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
            "rounds": 1,
            "local_steps": 2,
            "parallel": 1,
            "partition": "dirichlet",
            "alpha": 1.0,
            "wait_clients_s": 60,
        },
    }
    path = tmp_path / "federated.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["federate", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "up B/client" in out and "bytes per client per round: up" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and 0 < summary["max_bytes_up"] < 1024
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in lines] == [[0, 1]]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_federate_bad_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("federated: {partition: random}\n")
    assert main(["federate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"zotune: error: {path}: federated.partition") and err.count("\n") == 1
