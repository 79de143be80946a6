"""Accuracy against wall-clock on the demo task: P-RGE, sequential RGE and first-order backprop on
the embedded SmolLM2-135M, in one run, each method in its own process, one after another.

Two budgets:
- `--budget S` (default): the same S seconds of training (evaluations excluded) per method,
  constant lr, frequent evaluations: the accuracy-against-time curve.
- `--examples N`: the same N training examples per method, each with its demo recipe (P-RGE and
  RGE: configs/demo.yaml as is, N/4 steps; first-order: AdamW lr 1e-3 batch 16, N/16 steps):
  accuracy, step time and peak memory at equal examples seen.

Each run is `zotune train` from configs/demo.yaml with `train.track_test` (test curve; model
selection stays on dev). Writes benchmarks/results/<name>.md and <name>.png.

    .venv/bin/python benchmarks/bench_accuracy.py [--budget 120] [--only prge,rge,fo]
    .venv/bin/python benchmarks/bench_accuracy.py --examples 960 --name accuracy-equal-examples
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

FO = [
    "--optim.estimator",
    "fo",
    "--optim.optimizer",
    "adamw",
    "--optim.lr",
    "1e-3",
    "--optim.momentum",
    "0",
    "--optim.batch_size",
    "16",
]
METHODS = {  # name: (overrides of configs/demo.yaml, batch size)
    "prge": (["--optim.estimator", "prge"], 4),
    "rge": (["--optim.estimator", "rge"], 4),
    "fo": (FO, 16),
}


def budget_args(name: str, budget: float) -> list[str]:
    """Constant lr, stop on the time budget, evaluate about every 30-40 s of training."""
    # About every 30-40 s of training; each evaluation (200 dev + 500 test) costs about 30 s, which
    # is most of this stage's time beyond the budgets (make bench must stay under 40 minutes).
    every = "15" if name == "fo" else "20"
    return [
        "--train.steps",
        "100000",
        "--optim.schedule",
        "constant",
        "--train.time_limit_s",
        str(budget),
        "--train.eval_every",
        every,
    ]


def examples_args(name: str, examples: int) -> list[str]:
    """The method's own recipe for `examples` examples, evaluated at half-way and at the end."""
    steps = examples // METHODS[name][1]
    cosine = [] if name == "fo" else ["--optim.schedule", "cosine"]
    return ["--train.steps", str(steps), "--train.eval_every", str(max(1, steps // 2)), *cosine]


def run(name: str, extra: list[str], out: Path, threads: int, reuse: bool = False) -> dict:
    run_dir = out / name
    if reuse and (run_dir / "summary.json").is_file():
        return load(name, run_dir, process_s=float("nan"), reused=True)
    cmd = [
        sys.executable,
        "-m",
        "zotune.cli",
        "train",
        "--overwrite",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--train.threads",
        str(threads),
        "--train.track_test",
        "true",
        "--train.checkpoint_every",
        "100000",
        "--train.out_dir",
        str(run_dir),
        "--train.progress",
        "false",
        *METHODS[name][0],
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return load(name, run_dir, time.perf_counter() - t0)


def load(name: str, run_dir: Path, process_s: float, reused: bool = False) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in metrics if r["type"] == "train"]
    dt = [b - a for a, b in zip(times, times[1:])]
    return {
        "name": name,
        "summary": summary,
        "metrics": metrics,
        "process_s": process_s,
        "step_s": statistics.median(dt),
        "step_s_min": min(dt),
        "step_s_max": max(dt),
        "reused": reused,
    }


def curve(r: dict) -> list[tuple[float, float]]:
    """(training seconds, test accuracy) at every evaluation, zero-shot first."""
    time_at = {m["done"]: m["time"] for m in r["metrics"] if m["type"] == "train"}
    time_at[0] = 0.0
    return [
        (time_at[m["done"]], m["accuracy"])
        for m in r["metrics"]
        if m["type"] in ("eval", "track") and m["split"] == "test"
    ]


def report(results: list[dict], budget: str, threads: int, command: str) -> str:
    zs = results[0]["summary"]["zero_shot"]
    lines = [
        "# Accuracy against training time on the demo task (SmolLM2-135M, multiemo pos/neg)",
        "",
        f"Command: `{command}`. Machine: {machine_line(machine())}; {threads} torch threads. "
        f"Each method: its own process, run one after another, {budget}; "
        "q=4 b=4 for P-RGE and RGE, AdamW lr 1e-3 batch 16 for first-order. "
        "Test accuracy on 500 examples; 'selected' is the state chosen on dev.",
        "",
        f"Zero-shot test accuracy: {zs['test']['accuracy']:.3f} raw, "
        f"{zs['test_calibrated']['accuracy']:.3f} with a threshold chosen on dev.",
        "",
        "| method | steps | examples seen | step s median (min-max) | test at the end | "
        "test of dev-selected | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, c = r["summary"], curve(r)
        b = METHODS[r["name"]][1]
        lines.append(
            f"| {r['name']} | {s['steps']} | {s['steps'] * b} | {r['step_s']:.2f} "
            f"({r['step_s_min']:.2f}-{r['step_s_max']:.2f}) | {c[-1][1]:.3f} | "
            f"{s['test']['accuracy']:.3f} (step {s['selected_step']}) | {s['peak_rss_mb']:.0f} |"
        )
    reused = [r["name"] for r in results if r["reused"]]
    if reused:
        lines += ["", f"Rows reused from the saved runs of this command (`--reuse`): {', '.join(reused)}."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str) -> None:
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
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per method")
    p.add_argument(
        "--examples",
        type=int,
        default=None,
        help="train every method on this many examples instead of a time budget",
    )
    p.add_argument("--only", default="prge,rge,fo")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_accuracy"))
    p.add_argument("--name", default=None, help="result name (default accuracy / accuracy-examples)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take a method's finished run from --out instead of training it again",
    )
    args = p.parse_args()
    if args.examples:
        name, command = (
            args.name or "accuracy-examples",
            f"benchmarks/bench_accuracy.py --examples {args.examples}",
        )
        budget = f"{args.examples} training examples each with its demo recipe (ZO: cosine lr)"
        title = f"Test accuracy against training time ({args.examples} examples per method)"
    else:
        name, command = args.name or "accuracy", f"benchmarks/bench_accuracy.py --budget {args.budget:g}"
        budget = f"{args.budget:.0f} s of training each (evaluation time excluded), constant lr"
        title = "Test accuracy against training time (same budget per method)"
    results = []
    for method in args.only.split(","):
        extra = examples_args(method, args.examples) if args.examples else budget_args(method, args.budget)
        print(f"running {method}: {' '.join(extra)}", flush=True)
        results.append(run(method, extra, Path(args.out) / name, args.threads, args.reuse))
        print(
            f"  test {curve(results[-1])[-1][1]:.3f} after {results[-1]['summary']['steps']} steps",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(report(results, budget, args.threads, command))
    plot(results, RESULTS / f"{name}.png", title)
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
