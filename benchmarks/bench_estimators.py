"""P-RGE vs sequential RGE vs first-order on the demo task, at equal examples seen.

Each method trains in its own process (python -m zotune.cli train) from configs/demo.yaml with
its own overrides; the script collects each run's summary.json and metrics.jsonl and writes
benchmarks/results/estimators.md and estimators.png (dev accuracy against wall-clock).

    .venv/bin/python benchmarks/bench_estimators.py [--steps 200] [--only prge,fo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def methods(steps: int) -> dict[str, list[str]]:
    """Every method sees steps * 4 training examples."""
    return {
        "prge": ["--optim.estimator", "prge"],
        "prge-constant": ["--optim.estimator", "prge", "--optim.schedule", "constant"],
        "prge-linear": ["--optim.estimator", "prge", "--optim.schedule", "linear"],
        "rge": ["--optim.estimator", "rge"],
        "fo": ["--optim.estimator", "fo", "--optim.lr", "1e-3", "--optim.batch_size", "16",
               "--optim.schedule", "constant", "--train.steps", str(steps // 4),
               "--train.eval_every", str(max(1, steps // 16))],
    }


def step_times(metrics: list[dict]) -> list[float]:
    train = [r for r in metrics if r["type"] == "train"]
    times = [r["time"] for r in train]
    return [b - a for a, b in zip(times, times[1:])]


def run(name: str, extra: list[str], steps: int, out: Path, threads: int) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "zotune.cli", "train", "--config", str(ROOT / "configs/demo.yaml"),
           "--train.threads", str(threads),
           "--train.steps", str(steps), "--train.out_dir", str(run_dir),
           "--train.progress", "false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dt = step_times(metrics)
    return {"name": name, "threads": threads, "summary": summary, "metrics": metrics, "process_s": time.perf_counter() - t0,
            "step_s": statistics.median(dt) if dt else float("nan"),
            "step_s_min": min(dt, default=float("nan")), "step_s_max": max(dt, default=float("nan"))}


def report(results: list[dict], steps: int) -> str:
    load = os.getloadavg()
    lines = [
        "# Estimators on the demo task (SmolLM2-135M, multiemo positive/negative)",
        "",
        f"Command: `.venv/bin/python {' '.join(sys.argv)}`. "
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, load average at the end "
        f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}. Each method ran in its own process, one after "
        "another. Every method saw the same number of training examples "
        f"({steps * 4}); P-RGE and RGE use q=4, b=4; first-order uses AdamW, batch 16. "
        "Test accuracy is of the adapter selected on dev (500 test examples).",
        "",
        "| method | threads | steps | test acc | dev acc | zero-shot test (raw / dev threshold) | "
        "step s (median, min-max) | train wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        zs = s["zero_shot"]
        lines.append(
            f"| {r['name']} | {r['threads']} | {s['steps']} | {s['test']['accuracy']:.3f} | {s['dev']['accuracy']:.3f} | "
            f"{zs['test']['accuracy']:.3f} / {zs['test_calibrated']['accuracy']:.3f} | "
            f"{r['step_s']:.2f} ({r['step_s_min']:.2f}-{r['step_s_max']:.2f}) | "
            f"{s['train_wall_s']:.0f} | {s['peak_rss_mb']:.0f} |")
    by = {r["name"]: r for r in results}
    if "prge" in by and "rge" in by:
        lines += ["", f"Step time ratio sequential RGE / P-RGE: "
                      f"{by['rge']['step_s'] / by['prge']['step_s']:.2f}."]
    if "prge" in by and "fo" in by:
        lines += [f"Peak RSS ratio P-RGE / first-order: "
                  f"{by['prge']['summary']['peak_rss_mb'] / by['fo']['summary']['peak_rss_mb']:.2f}."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        train = {m["done"]: m["time"] for m in r["metrics"] if m["type"] == "train"}
        pts = [(train.get(m["done"], 0.0), m["accuracy"]) for m in r["metrics"]
               if m["type"] == "eval" and m["split"] == "dev"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=r["name"])
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("dev accuracy")
    ax.set_title("Dev accuracy against wall-clock (2 CPU cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--only", default="prge,rge,fo")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_estimators"))
    p.add_argument("--name", default="estimators")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    table = methods(args.steps)
    results = []
    for name in args.only.split(","):
        print(f"running {name} ...", flush=True)
        results.append(run(name, table[name], args.steps, Path(args.out), args.threads))
        print(f"  test {results[-1]['summary']['test']['accuracy']:.3f}, "
              f"step {results[-1]['step_s']:.2f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(report(results, args.steps))
    plot(results, RESULTS / f"{args.name}.png")
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
