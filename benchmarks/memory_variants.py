"""Peak RSS of the eager P-RGE dual step under three versions of the code where z and the
perturbed B stacks are made (git worktrees passed as PYTHONPATH), beside a forward of the same
rows; one process each (benchmarks/lockstep.py), 2 steps, 1 thread. A memory check, not a timing
benchmark. Used once in session 3 to choose how eager P-RGE holds z:

    git worktree add /tmp/wt-s2 3b76559       # z and every layer's stacks built up front
    git worktree add /tmp/wt-redraw 91b520c   # stacks per layer, z redrawn for the update
    .venv/bin/python benchmarks/memory_variants.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lockstep import run_group  # noqa: E402

VARIANTS = {"s2": "/tmp/wt-s2/src", "redraw": "/tmp/wt-redraw/src",
            "upfront": str(Path(__file__).resolve().parents[1] / "src")}  # upfront: this checkout


def main() -> None:
    specs = {}
    for q, b in ((4, 4), (16, 1)):
        for name, path in VARIANTS.items():
            specs[f"{name}-{q},{b}"] = {"mode": "prge", "dual": True, "q": q, "b": b, "T": 64,
                                        "threads": 1, "env": {"PYTHONPATH": path}}
        specs[f"forward-{q},{b}"] = {"mode": "forward", "q": q, "b": b, "rows": 2 * q * b, "T": 64,
                                     "threads": 1}
    for name, r in run_group(specs, 2, log=lambda m: None).items():
        print(f"{name:16s} peak {r.get('peak_rss_mb', float('nan')):6.0f} MB  {r.get('error', '')}")


if __name__ == "__main__":
    main()
