"""Distributed P-RGE at the demo shapes: step time and bytes per step on 1 and 2 processes.

Each configuration is a real `zotune train` of configs/demo.yaml (SmolLM2-135M, LoRA-FA r=16 on
every linear, T=64) for a few steps, one torch thread per process; two processes are a torchrun
job on 127.0.0.1 (gloo). Step time: rank 0's training clock (metrics.jsonl, evaluations and
checkpoints excluded), the first step dropped as warm-up, median (min-max). Bytes: what this
rank's collectives carried (run/distributed.json), beside the all-reduce of the trained tensors
that data-parallel first-order training would make every step. Dev and test are cut to 20
examples each (evaluation is not what this measures). Writes benchmarks/results/distributed.md.

    python benchmarks/bench_distributed.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lockstep import machine, machine_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# (q, b, processes, parallel mode)
RUNS = [(4, 4, 1, "none"), (4, 4, 2, "data"), (4, 4, 2, "query"), (16, 1, 1, "none"), (16, 1, 2, "query")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(q: int, b: int, procs: int, mode: str, steps: int, out: Path) -> dict:
    args = [
        "-m",
        "zotune.cli",
        "train",
        "--overwrite",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--optim.q",
        str(q),
        "--optim.batch_size",
        str(b),
        "--train.steps",
        str(steps),
        "--train.eval_every",
        str(steps),
        "--train.checkpoint_every",
        str(steps),
        "--data.train_size",
        "64",
        "--data.dev_size",
        "20",
        "--data.test_size",
        "20",
        "--train.eval_batch_size",
        "10",
        "--train.threads",
        "1",
        "--train.progress",
        "false",
        "--train.parallel",
        mode,
        "--train.out_dir",
        str(out),
    ]
    cmd = [sys.executable]
    if procs > 1:
        cmd += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(procs),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    job = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if job.returncode != 0:
        raise SystemExit(f"{q},{b} x{procs} {mode} failed:\n{job.stderr[-3000:]}")
    times = [
        r["time"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["type"] == "train"
    ]
    per_step = [t1 - t0_ for t0_, t1 in zip(times, times[1:])]  # step 1 is the warm-up
    header, *lines = map(json.loads, (out / "replay.jsonl").read_text().splitlines())
    report = {
        "q": q,
        "b": b,
        "procs": procs,
        "mode": mode,
        "wall_s": time.perf_counter() - t0,
        "median_s": statistics.median(per_step),
        "min_s": min(per_step),
        "max_s": max(per_step),
        "numel": header["layout"]["numel"],
        "g": [r["g"] for r in lines],
    }
    if procs > 1:
        d = json.loads((out / "distributed.json").read_text())
        report["step_bytes"] = d["traffic"]["step"]["bytes"] / d["steps"]
        report["eval_bytes"] = d["traffic"]["eval"]["bytes"]
        report["other_bytes"] = d["traffic"]["start"]["bytes"] + d["traffic"]["check"]["bytes"]
    return report


def compare_g(g: list[list[float]], ref: list[list[float]]) -> str:
    if g == ref:
        return "bit-identical"
    rel = max(abs(x - y) / max(abs(y), 1e-30) for a, b in zip(g, ref) for x, y in zip(a, b))
    return f"max relative difference {rel:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    m = machine()
    t_all = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="zotune-bench-dist-") as tmp:
        for i, (q, b, procs, mode) in enumerate(RUNS):
            r = run_one(q, b, procs, mode, args.steps, Path(tmp) / f"run{i}")
            print(json.dumps(r), flush=True)
            rows.append(r)
    minutes = (time.perf_counter() - t_all) / 60
    single = {(r["q"], r["b"]): r for r in rows if r["procs"] == 1}
    numel = rows[0]["numel"]
    fo_bytes = numel * 4  # fp32 gradient of the trained tensors, all-reduced every step
    lines = [
        "# Distributed P-RGE: step time and bytes per step, 1 and 2 processes",
        "",
        f"Command: `benchmarks/bench_distributed.py --steps {args.steps}`. Machine: "
        f"{machine_line(m)}. configs/demo.yaml (SmolLM2-135M fp32, LoRA-FA r=16 on every "
        f"linear, {numel} trained values, T=64) with the q, b below; one torch thread per "
        f"process; 2 processes = `torchrun --nproc_per_node 2` on 127.0.0.1 (gloo). {args.steps} "
        f"steps per run, the first dropped; median (min-max) seconds of rank 0's training clock. "
        f"Whole script: {minutes:.1f} min.",
        "",
        "| q, b | processes | train.parallel | step s | speedup over 1 process | "
        "bytes per step (collectives) | data-parallel first-order all-reduce per step | "
        "ratio | g of every step against 1 process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one = single[(r["q"], r["b"])]
        speed = one["median_s"] / r["median_s"]
        same = compare_g(r["g"], one["g"]) if r["procs"] > 1 else ""
        sent = f"{r['step_bytes']:.0f}" if "step_bytes" in r else "0"
        ratio = f"1 : {fo_bytes / r['step_bytes']:,.0f}" if "step_bytes" in r else ""
        lines.append(
            f"| {r['q']}, {r['b']} | {r['procs']} | {r['mode']} | "
            f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {speed:.2f} | "
            f"{sent} | {fo_bytes:,} ({numel:,} floats) | {ratio} | {same} |"
        )
    evals = [r for r in rows if "eval_bytes" in r]
    eval_bytes = ", ".join(f"{r['eval_bytes']:.0f}" for r in evals)
    other_bytes = ", ".join(f"{r['other_bytes']:.0f}" for r in evals)
    lines += [
        "",
        "Bytes per step are the payload of the step's one all-reduce as this rank hands it to "
        "the collective (a ring all-reduce moves 2(R-1)/R times that per rank): data mode "
        "4q + R floats (per-replica loss sums, token counts, one NaN flag per rank), query mode "
        "2q + R floats (the 2q losses, zeros where a rank has none, and the flags). "
        "Evaluation gathers the scores of each split once per evaluation "
        f"({eval_bytes} bytes over the 4 evaluations "
        "of 20 examples in these runs); start-up and checkpoint checks carried "
        f"{other_bytes} bytes (config and state hashes). "
        "Weights and adapters never cross the wire.",
        "",
        "The 2-process times share this machine's cores with whatever else runs on it (the load "
        "average above): where fewer cores are free than processes, they include waiting for a "
        "core, and the speedup column measures that as much as the split.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "distributed.json").write_text(json.dumps({"machine": m, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
