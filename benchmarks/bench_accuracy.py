"""Accuracy against wall-clock on the demo task: P-RGE, sequential RGE and first-order backprop,
each given the same budget of training time (evaluations excluded) on the embedded SmolLM2-135M.

Each method trains in its own process (`zotune train` from configs/demo.yaml, constant lr,
`train.time_limit_s` = the budget, `train.track_test` for the curve; model selection stays on
dev). Writes benchmarks/results/<name>.md and <name>.png (test accuracy against training time).

    .venv/bin/python benchmarks/bench_accuracy.py [--budget 180] [--only prge,rge,fo]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lockstep import machine, machine_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

METHODS = {  # overrides of configs/demo.yaml; every method evaluates about every 25-40 s
    "prge": ["--optim.estimator", "prge", "--train.eval_every", "20"],
    "rge": ["--optim.estimator", "rge", "--train.eval_every", "20"],
    "fo": ["--optim.estimator", "fo", "--optim.lr", "1e-3", "--optim.batch_size", "16",
           "--train.eval_every", "10"],
}


def run(name: str, budget: float, out: Path, threads: int) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "zotune.cli", "train", "--config", str(ROOT / "configs/demo.yaml"),
           "--train.threads", str(threads), "--train.steps", "100000", "--optim.schedule", "constant",
           "--train.time_limit_s", str(budget), "--train.track_test", "true",
           "--train.checkpoint_every", "100000", "--train.out_dir", str(run_dir),
           "--train.progress", "false", *METHODS[name]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in metrics if r["type"] == "train"]
    dt = [b - a for a, b in zip(times, times[1:])]
    return {"name": name, "summary": summary, "metrics": metrics, "process_s": time.perf_counter() - t0,
            "step_s": statistics.median(dt), "step_s_min": min(dt), "step_s_max": max(dt)}


def curve(r: dict) -> list[tuple[float, float]]:
    """(training seconds, test accuracy) at every evaluation, zero-shot first."""
    time_at = {m["done"]: m["time"] for m in r["metrics"] if m["type"] == "train"}
    time_at[0] = 0.0
    return [(time_at[m["done"]], m["accuracy"]) for m in r["metrics"]
            if m["split"] == "test" and m["type"] in ("eval", "track")]


def report(results: list[dict], budget: float, threads: int, command: str) -> str:
    zs = results[0]["summary"]["zero_shot"]
    lines = [
        "# Accuracy against training time on the demo task (SmolLM2-135M, multiemo pos/neg)", "",
        f"Command: `{command}`. Machine: {machine_line(machine())}; {threads} torch threads. "
        f"Each method: its own process, run one after another, {budget:.0f} s of training "
        "(evaluation time excluded), constant lr, q=4 b=4 for P-RGE and RGE, AdamW lr 1e-3 batch 16 "
        "for first-order. Test accuracy on 500 examples; 'selected' is the state chosen on dev.", "",
        f"Zero-shot test accuracy: {zs['test']['accuracy']:.3f} raw, "
        f"{zs['test_calibrated']['accuracy']:.3f} with a threshold chosen on dev.", "",
        "| method | steps in budget | examples seen | step s median (min-max) | test at end of budget | "
        "test of dev-selected | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, c = r["summary"], curve(r)
        b = 16 if r["name"] == "fo" else 4
        lines.append(f"| {r['name']} | {s['steps']} | {s['steps'] * b} | {r['step_s']:.2f} "
                     f"({r['step_s_min']:.2f}-{r['step_s_max']:.2f}) | {c[-1][1]:.3f} | "
                     f"{s['test']['accuracy']:.3f} (step {s['selected_step']}) | {s['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        c = curve(r)
        ax.plot([p[0] for p in c], [p[1] for p in c], "o-", label=r["name"])
    zs = results[0]["summary"]["zero_shot"]["test_calibrated"]["accuracy"]
    ax.axhline(zs, color="grey", ls=":", label="zero-shot, dev threshold")
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy against training time (same budget per method)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budget", type=float, default=180.0, help="training seconds per method")
    p.add_argument("--only", default="prge,rge,fo")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_accuracy"))
    p.add_argument("--name", default="accuracy")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    command = f"benchmarks/bench_accuracy.py --budget {args.budget:g}"
    results = []
    for name in args.only.split(","):
        print(f"running {name} for {args.budget:g} s of training ...", flush=True)
        results.append(run(name, args.budget, Path(args.out), args.threads))
        print(f"  test {curve(results[-1])[-1][1]:.3f} after {results[-1]['summary']['steps']} steps",
              flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(report(results, args.budget, args.threads, command))
    plot(results, RESULTS / f"{args.name}.png")
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
