"""Federated fine-tuning on the demo task (SmolLM2-135M, multiemo positive/negative), 8 clients:
(a) zeroth-order federated (clients send (seed, g) records), (b) FedAvg with first-order clients
(the server averages B), each with IID and Dirichlet(alpha) label-skewed shards, and (c)
centralised P-RGE on the same number of training examples. Test accuracy against rounds (plot),
bytes up and down per client per round, round wall time.

    .venv/bin/python benchmarks/bench_federated.py            # sized for about 10 min on 2 cores
    .venv/bin/python benchmarks/bench_federated.py --rounds 20 --local-steps 4 --test-size 500

The default is 5 configurations of 4 rounds. Each federated run pays a fixed start (Ray, the
workers' model loads, the zero-shot evaluation) and then, per round, 4 clients x 2 P-RGE steps
(or first-order steps) 2 at a time plus a dev/test evaluation: `--only zo-iid,fedavg-iid
--rounds 2` takes 4.9 min on 2 cores shared with other jobs (results/federated.md).

Each federated run is `zotune federate` (Flower's simulation engine, 2 clients at once); the
centralised run is `zotune train` with the dev/test evaluations at the same example counts.
Writes benchmarks/results/federated.md, federated.json and federated.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from zotune.config import load_config  # noqa: E402


def base_config(args):
    cfg = load_config(HERE.parent / "configs" / "federated.yaml")
    d, f = cfg.data, cfg.federated
    d.train_size, d.dev_size, d.test_size = args.train_size, args.dev_size, args.test_size
    f.clients, f.rounds, f.local_steps = args.clients, args.rounds, args.local_steps
    f.fraction, f.eval_every, f.alpha = args.fraction, 1, args.alpha
    cfg.train.threads = 1
    return cfg


def run_federated(cfg, name, out):
    from zotune.federated.simulate import federate

    cfg.train.out_dir = str(out / name)
    t0 = time.perf_counter()
    summary = federate(cfg)
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    traffic = [b for r in lines for b in r["bytes"]]
    return {
        "name": name,
        "mode": cfg.federated.mode,
        "server_lr": cfg.federated.server_lr,
        "partition": cfg.federated.partition,
        "zero_shot": summary["zero_shot"]["test"]["accuracy"],
        "zero_shot_calibrated": summary["zero_shot"].get("test_calibrated", {}).get("accuracy"),
        "curve": [[r["round"] + 1, r["test"]["accuracy"]] for r in lines if "test" in r],
        "test": summary["test"]["accuracy"],
        "best_dev_test": summary["best_dev_test"]["accuracy"],
        "up_mean": statistics.mean(b["up"] for b in traffic),
        "up_max": max(b["up"] for b in traffic),
        "down_mean": statistics.mean(b["down"] for b in traffic),
        "down_max": max(b["down"] for b in traffic),
        "round_s": statistics.median(r["wall_s"] for r in lines),
        "wall_s": time.perf_counter() - t0,
    }


def run_central(cfg, out):
    """P-RGE on one machine with the examples the federated runs consume: every round's
    sampled clients x local steps x batch."""
    from zotune.train.run import train

    f = cfg.federated
    per_round = max(1, round(f.fraction * f.clients)) * f.local_steps
    cfg.train.steps, cfg.train.eval_every = f.rounds * per_round, per_round
    cfg.train.checkpoint_every, cfg.train.track_test = per_round, True
    cfg.train.out_dir = str(out / "central")
    t0 = time.perf_counter()
    summary = train(cfg, overwrite=True)
    metrics = [json.loads(x) for x in (out / "central" / "metrics.jsonl").read_text().splitlines()]
    curve = [
        [m["done"] // per_round, m["accuracy"]] for m in metrics if m.get("type") == "track" and m["done"] > 0
    ]
    return {
        "name": "central",
        "mode": "central P-RGE",
        "partition": "-",
        "curve": curve,
        "test": curve[-1][1] if curve else None,
        "best_dev_test": summary["test"]["accuracy"],
        "up_mean": 0,
        "up_max": 0,
        "down_mean": 0,
        "down_max": 0,
        "round_s": None,
        "wall_s": time.perf_counter() - t0,
        "zero_shot": summary["zero_shot"]["test"]["accuracy"],
        "zero_shot_calibrated": summary["zero_shot"].get("test_calibrated", {}).get("accuracy"),
    }


SETTINGS = ("clients", "rounds", "local_steps", "fraction", "alpha", "train_size", "dev_size", "test_size")


def previous(path: Path, args) -> dict:
    """The finished runs of an earlier invocation with the same settings, by name."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if any(old["args"].get(k) != getattr(args, k) for k in SETTINGS):
        return {}
    return {r["name"]: r for r in old["results"]}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker="o", label=r["name"])
    ax.axhline(results[0]["zero_shot"], color="gray", ls=":", label="zero-shot")
    if results[0]["zero_shot_calibrated"]:
        ax.axhline(
            results[0]["zero_shot_calibrated"], color="gray", ls="--", label="zero-shot, dev threshold"
        )
    ax.set_xlabel("round (central: the same examples)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--dev-size", type=int, default=50)
    p.add_argument("--test-size", type=int, default=100)
    p.add_argument(
        "--only",
        default="zo-iid,zo-dirichlet,zo-iid-sum,zo-dirichlet-sum,fedavg-iid,fedavg-dirichlet,central",
        help="runs: MODE-PARTITION[-sum] (sum: federated.server_lr = the clients of a round, so B "
        "moves by their summed updates; otherwise 1, FedAvg) and central",
    )
    p.add_argument("--out", default=str(HERE.parent / "runs" / "bench-federated"))
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take the runs results/federated.json already holds for the same settings",
    )
    args = p.parse_args()
    out = Path(args.out)
    base = base_config(args)
    res = HERE / "results"
    kept = previous(res / "federated.json", args) if args.reuse else {}
    results, t0 = [], time.perf_counter()
    for name in args.only.split(","):
        cfg = copy.deepcopy(base)
        if name in kept:
            results.append(kept[name])
        elif name == "central":
            results.append(run_central(cfg, out))
        else:
            mode, part, *how = name.split("-")
            cfg.federated.mode, cfg.federated.partition = mode, part
            if how == ["sum"]:
                cfg.federated.server_lr = float(max(1, round(cfg.federated.fraction * cfg.federated.clients)))
            results.append(run_federated(cfg, name, out))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), flush=True)
    total = time.perf_counter() - t0 + sum(r["wall_s"] for r in results if r["name"] in kept)
    (res / "federated.json").write_text(
        json.dumps({"args": vars(args), "results": results, "total_s": total}, indent=1)
    )
    plot(results, res / "federated.png")
    cmd = "python benchmarks/bench_federated.py " + " ".join(sys.argv[1:])
    rows = [
        "| run | partition | server lr | test acc (last round) | test acc (dev-selected) | "
        "up B/client/round (mean, max) | down B/client/round (mean, max) | "
        "round wall s (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    for r in results:
        central = r["name"] == "central"
        up = "-" if central else f"{r['up_mean']:.0f}, {r['up_max']}"
        down = "-" if central else f"{r['down_mean']:.0f}, {r['down_max']}"
        wall = "-" if r["round_s"] is None else f"{r['round_s']:.1f}"
        rows.append(
            f"| {r['name']} | {r['partition']} | {r.get('server_lr', 1.0) if r['mode'] == 'zo' else '-'} | "
            f"{fmt(r['test'])} | "
            f"{fmt(r['best_dev_test'])} | {up} | {down} | {wall} |"
        )
    a = args
    text = (
        f"# Federated fine-tuning: seeds and scalars against FedAvg\n\n"
        f"`{cmd.strip()}` (total {total / 60:.1f} min on this machine's 2 shared cores)\n\n"
        f"SmolLM2-135M, multiemo positive/negative, LoRA-FA r=16 on all projections; "
        f"{a.clients} clients, {a.fraction:g} of them sampled per round, {a.rounds} rounds "
        f"of {a.local_steps} local steps (batch 4); train {a.train_size}, dev {a.dev_size}, "
        f"test {a.test_size}; Dirichlet alpha {a.alpha}. Zero-shot test accuracy "
        f"{results[0]['zero_shot']:.3f}"
        + (
            f" ({results[0]['zero_shot_calibrated']:.3f} with a dev-chosen threshold)"
            if results[0]["zero_shot_calibrated"]
            else ""
        )
        + ".\n\n"
        + "\n".join(rows)
        + "\n\n![test accuracy against rounds](federated.png)\n"
    )
    (res / "federated.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
