"""Step time of the P-RGE step in eager PyTorch and in ONNX Runtime (fp32 and 4-bit programs) on
SmolLM2-135M at the demo's shapes: each engine in its own process, interleaved
(benchmarks/lockstep.py), medians and ratios to eager.

    python benchmarks/bench_onnx.py --onnx fp32=.cache/onnx-int4/fp32.onnx \
        int4=.cache/onnx-int4/int4-b32.onnx [--steps 7] [--threads 2]

The programs come from `zotune export --engine onnx` (benchmarks/onnx_int4_g.py exports both).
The batch is synthetic, b rows of T tokens with no padding, so every engine pays for T positions.
Writes benchmarks/results/onnx-step.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lockstep import fmt_time, machine, run_group  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--onnx", nargs="+", required=True, help="name=path of exported programs")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx-step"))
    args = p.parse_args()
    common = {"q": args.q, "b": args.b, "T": args.T, "threads": args.threads}
    specs = {"eager": {"mode": "prge", "dual": True, **common}}
    for item in args.onnx:
        name, _, path = item.partition("=")
        specs[f"ort {name}"] = {"mode": "ort", "onnx": path, **common}
    results = run_group(specs, args.steps)
    base = results["eager"].get("median_s")
    m = machine()
    lines = [
        "# P-RGE step: eager PyTorch and ONNX Runtime (SmolLM2-135M)",
        "",
        f"Command: `python benchmarks/bench_onnx.py {' '.join(sys.argv[1:])}`. Machine: "
        f"{m['cores']} cores ({m['cpu']}), load average "
        f"{'/'.join(f'{x:.2f}' for x in m['load_average'])} at the end; torch {m['torch']}. "
        f"{args.threads} threads per engine; q={args.q}, b={args.b}, T={args.T}, LoRA-FA r=16 "
        f"on all linears (ONNX: the exported programs' adapter); {args.steps} measured steps "
        "after 1 warm-up, engines interleaved, one process each; median (min-max) seconds.",
        "",
        "| engine | step s | step / eager | peak RSS MB | peak / eager | program files MB |",
        "|---|---|---|---|---|---|",
    ]
    rss = results["eager"].get("peak_rss_mb")
    for name, r in results.items():
        ratio = f"{r['median_s'] / base:.2f}" if "error" not in r and base else "-"
        peak = r.get("peak_rss_mb", 0)
        rel = f"{peak / rss:.2f}" if rss and peak else "-"
        files = f"{program_mb(specs[name]['onnx']):.0f}" if "onnx" in specs[name] else "-"
        lines.append(f"| {name} | {fmt_time(r)} | {ratio} | {peak:.0f} | {rel} | {files} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(
        json.dumps({"results": results, "machine": m, "args": vars(args)}, indent=1)
    )
    print("\n".join(lines))


def program_mb(path: str) -> float:
    """Bytes of every file the program's metadata lists: step and evaluation graphs, weights."""
    meta = json.loads(Path(path + ".json").read_text())
    parts = [meta["size"], meta["graphs"]["forward"]["size"], meta.get("weights", {}).get("size", 0)]
    return sum(parts) / 2**20


if __name__ == "__main__":
    main()
