"""Peak RSS of the eager P-RGE dual step under three versions of the code where z and the
perturbed B stacks are made (git worktrees passed as PYTHONPATH), beside a forward of the same
rows; one process each (benchmarks/lockstep.py), 2 steps, 1 thread. A memory check, not a timing
benchmark. Used in session 3 to choose how eager P-RGE holds z and the stacks:

    git worktree add /tmp/wt-redraw 91b520c     # stacks per layer, z redrawn for the update
    git worktree add /tmp/wt-perlayer 2c2ad67   # z up front, stacks per layer
    .venv/bin/python benchmarks/memory_variants.py   # beside this checkout (z, stacks up front)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lockstep import run_group  # noqa: E402

VARIANTS = {"current": str(Path(__file__).resolve().parents[1] / "src"),
            "redraw": "/tmp/wt-redraw/src", "perlayer": "/tmp/wt-perlayer/src"}


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
