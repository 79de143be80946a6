"""Where the time of one P-RGE step goes, next to a plain forward of the same rows (torch
profiler, eager, SmolLM2-135M, synthetic rows of T tokens). Prints the top operators of each and
writes benchmarks/results/<name>.md.

    .venv/bin/python benchmarks/profile_step.py [--q 4 --b 4 --T 64 --threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from worker import build

RESULTS = Path(__file__).resolve().parent / "results"


def top(fn, steps: int, rows: int = 18) -> tuple[str, float]:
    fn(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            fn(i)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e6
    table = events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)
    return table, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--name", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = {"q": args.q, "b": args.b, "T": args.T}
    out = [f"# Profile: P-RGE dual step vs plain forward (q={args.q}, b={args.b}, T={args.T}, "
           f"{args.threads} threads, {args.steps} steps each)", ""]
    totals = {}
    for label, spec in (("forward", {**base, "mode": "forward", "rows": 2 * args.q * args.b}),
                        ("prge", {**base, "mode": "prge", "dual": True})):
        table, totals[label] = top(build(spec), args.steps)
        out += [f"## {label}: {totals[label]:.3f} s of operator self time per step", "", "```",
                table, "```", ""]
    out.insert(2, f"P-RGE / forward, operator self time: {totals['prge'] / totals['forward']:.2f}")
    name = args.name or f"profile-q{args.q}-b{args.b}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
