"""P-RGE against sequential RGE and a plain forward on a GPU: the speedup target (>= 3x at q=16,
b=1) and the overhead, for SmolLM2-135M at the demo shapes (LoRA-FA r=16 on every linear, T=64).

Each configuration in its own process, interleaved (benchmarks/lockstep.py), the device
synchronised before every step's time is taken; medians (min-max). The GPU machine cannot reach
the 540 MB checkpoint, so `--random-init` builds SmolLM2 from its config with random weights:
step time does not depend on the weights' values. Writes benchmarks/results/gpu.md and gpu.json.

    python benchmarks/bench_gpu.py --model DIR_WITH_CONFIG --random-init [--steps 20]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lockstep import fmt_time, machine, machine_line, run_group

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [(1, 16), (4, 4), (16, 1)]
TARGET_SPEEDUP = 3.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--T", type=int, default=64)
    args = p.parse_args()
    base = {"T": args.T, "device": "cuda", "model": args.model, "random_init": args.random_init, "warmup": 3}
    groups = {}
    for q, b in SETTINGS:
        specs = {
            "prge-dual": {**base, "q": q, "b": b, "mode": "prge", "dual": True},
            "rge": {**base, "q": q, "b": b, "mode": "rge"},
            "forward": {**base, "q": q, "b": b, "mode": "forward", "rows": 2 * q * b},
        }
        print(f"q={q} b={b}", flush=True)
        groups[(q, b)] = run_group(specs, args.steps, log=lambda m: None)
    first = next(iter(groups.values()))["prge-dual"]
    m = machine()
    lines = [
        "# P-RGE on a GPU: step time against sequential RGE and a plain forward",
        "",
        f"Command: `benchmarks/bench_gpu.py{' --random-init' if args.random_init else ''} "
        f"--steps {args.steps}`. GPU: {first.get('gpu', '?')}; host: {machine_line(m)}. "
        f"SmolLM2-135M{' (config only, random weights)' if args.random_init else ''}, fp32, "
        f"LoRA-FA r=16 on all linears, T={args.T}; {args.steps} measured steps after 3 warm-ups, "
        "interleaved, one process each; median (min-max) seconds.",
        "",
        "| q, b | P-RGE dual | sequential RGE | forward of 2qb rows | RGE / P-RGE (speedup) | "
        "P-RGE / forward (overhead) | peak GPU memory MB: P-RGE / forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for (q, b), g in groups.items():
        pr, rge, fwd = g["prge-dual"], g["rge"], g["forward"]
        if any("error" in r for r in (pr, rge, fwd)):
            lines.append(
                f"| {q}, {b} | failed: " + " ".join(r.get("error", "")[-300:] for r in (pr, rge, fwd)) + " |"
            )
            continue
        speed = rge["median_s"] / pr["median_s"]
        verdict = ""
        if (q, b) == (16, 1):
            verdict = f" ({'meets' if speed >= TARGET_SPEEDUP else 'misses'} ≥ {TARGET_SPEEDUP})"
        lines.append(
            f"| {q}, {b} | {fmt_time(pr)} | {fmt_time(rge)} | {fmt_time(fwd)} | "
            f"{speed:.2f}{verdict} | {pr['median_s'] / fwd['median_s']:.2f} | "
            f"{pr['cuda_peak_mb']:.0f} / {fwd['cuda_peak_mb']:.0f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "gpu.json").write_text(
        json.dumps({"machine": m, "groups": {f"{q},{b}": g for (q, b), g in groups.items()}}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
