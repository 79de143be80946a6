"""`make bench`: every benchmark, one after another, each writing benchmarks/results/.

    .venv/bin/python benchmarks/run.py            # all stages (the first run also exports programs)
    .venv/bin/python benchmarks/run.py --quick    # step cost at (4,4) and (16,1) only

Stages: cost (bench_cost.py: estimator step time, memory, scaling), engines (bench_engines.py:
eager vs ExecuTorch fp32 / 8da4w; exports are cached under .cache/bench-engines), accuracy
(bench_accuracy.py: test accuracy against training time for P-RGE, RGE, first-order).
The time of each stage goes to benchmarks/results/bench-run[-quick].md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="cost,engines,accuracy")
    args = p.parse_args()
    stages = {
        "cost": ["bench_cost.py"] + (["--quick"] if args.quick else []),
        "engines": ["bench_engines.py"],
        "accuracy": ["bench_accuracy.py"],
    }
    chosen = ["cost"] if args.quick else args.only.split(",")
    t0 = time.perf_counter()
    minutes = {}
    for name in chosen:
        print(f"== {name}: {' '.join(stages[name])}", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / stages[name][0]), *stages[name][1:]], check=True)
        minutes[name] = (time.perf_counter() - t) / 60
    total = (time.perf_counter() - t0) / 60
    sys.path.insert(0, str(HERE))
    from lockstep import machine, machine_line

    lines = [
        f"# `make bench{'-quick' if args.quick else ''}`: time of each stage",
        "",
        f"Machine at the end: {machine_line(machine())}.",
        "",
        "| stage | minutes |",
        "|---|---|",
    ]
    lines += [f"| {name} (`{' '.join(stages[name])}`) | {m:.1f} |" for name, m in minutes.items()]
    lines += [f"| total | {total:.1f} |", ""]
    (HERE / "results" / f"bench-run{'-quick' if args.quick else ''}.md").write_text("\n".join(lines))
    print(f"== done in {total:.1f} min; results in {HERE / 'results'}")


if __name__ == "__main__":
    main()
