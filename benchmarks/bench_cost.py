"""What a P-RGE step costs on the embedded SmolLM2-135M: time against sequential RGE, first-order
and a plain inference forward over the same rows; peak memory; scaling with q, b and T.

Every configuration runs in its own process; the configurations of one table run interleaved
(benchmarks/lockstep.py). Writes benchmarks/results/<name>.md, <name>.json and <name>.png.

    .venv/bin/python benchmarks/bench_cost.py [--quick] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lockstep import fmt_time, machine, machine_line, run_group

RESULTS = Path(__file__).resolve().parent / "results"
T_DEMO = 64
TARGETS = {"overhead": 1.05, "speedup_16_1": 2.0, "train_vs_infer_rss": 1.10, "prge_vs_fo_rss": 0.5}


def cost_group(q: int, b: int, threads: int, full: bool) -> dict[str, dict]:
    """P-RGE dual, sequential RGE and a forward of the same rows; in full mode also P-RGE single
    and, at (4,4), first-order at batch 16 beside a forward of its 16 rows."""
    base = {"q": q, "b": b, "T": T_DEMO, "threads": threads}
    specs = {
        "prge-dual": {**base, "mode": "prge", "dual": True},
        "rge": {**base, "mode": "rge"},
        "forward": {**base, "mode": "forward", "rows": 2 * q * b},
    }
    if full:
        specs["prge-single"] = {**base, "mode": "prge", "dual": False}
    if full and (q, b) == (4, 4):
        specs["fo-b16"] = {"b": 16, "T": T_DEMO, "threads": threads, "mode": "fo"}
        specs["forward-b16"] = {"T": T_DEMO, "threads": threads, "mode": "forward", "rows": 16}
    return specs


def scaling_groups(threads: int) -> dict[str, tuple[str, list[int], dict[str, dict]]]:
    def spec(q, b, T):
        return {"mode": "prge", "dual": True, "q": q, "b": b, "T": T, "threads": threads}

    # Up to 8x the demo's rows and 2x its length: the 16x points (q=16 b=4, b=16, T=256) cost
    # about 4.6 minutes of stepping and lie on the same straight lines (16.4x, 17.3x, 9.1x).
    qs, bs, ts = (1, 2, 4, 8), (1, 2, 4, 8), (32, 64, 128)
    return {
        "q": ("q (b=4, T=64)", list(qs), {f"q={q}": spec(q, 4, 64) for q in qs}),
        "b": ("b (q=4, T=64)", list(bs), {f"b={b}": spec(4, b, 64) for b in bs}),
        "T": ("T (q=4, b=4)", list(ts), {f"T={t}": spec(4, 4, t) for t in ts}),
    }


def ratio(a: dict, b: dict, key: str = "median_s") -> float:
    if "error" in a or "error" in b:
        return float("nan")
    return a[key] / b[key]


def mark(value: float, target: float, at_most: bool = True) -> str:
    ok = value <= target if at_most else value >= target
    return f"{value:.2f} ({'meets' if ok else 'misses'} {'≤' if at_most else '≥'} {target})"


def report(cost: dict, scaling: dict, m: dict, args, wall: float) -> str:
    lines = [
        "# P-RGE step cost, memory and scaling (eager, SmolLM2-135M)",
        "",
        f"Command: `{args.command}`. Machine: {machine_line(m)}. "
        f"{args.threads} torch threads; T={T_DEMO} positions per row (no padding); "
        f"{args.steps} measured steps per configuration after 1 warm-up, interleaved; "
        f"times are median (min-max) seconds. Whole script: {wall / 60:.1f} min.",
        "",
        "## Step time against sequential RGE and a plain inference forward",
        "",
        "| q, b | P-RGE dual | P-RGE single | sequential RGE | forward of 2qb rows | "
        "RGE / P-RGE (speedup) | P-RGE dual / forward (overhead) | single / forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (q, b), g in cost.items():
        single = g.get("prge-single")
        single_s = fmt_time(single) if single else "-"
        single_r = f"{ratio(single, g['forward']):.2f}" if single else "-"
        speed = ratio(g["rge"], g["prge-dual"])
        over = ratio(g["prge-dual"], g["forward"])
        speed_s = mark(speed, TARGETS["speedup_16_1"], at_most=False) if (q, b) == (16, 1) else f"{speed:.2f}"
        lines.append(
            f"| {q}, {b} | {fmt_time(g['prge-dual'])} | {single_s} | "
            f"{fmt_time(g['rge'])} | {fmt_time(g['forward'])} | {speed_s} | "
            f"{mark(over, TARGETS['overhead'])} | {single_r} |"
        )
    fo_group = next((g for g in cost.values() if "fo-b16" in g), None)
    if fo_group:
        lines += [
            "",
            f"First-order AdamW at batch 16: {fmt_time(fo_group['fo-b16'])} s per step, "
            f"{ratio(fo_group['fo-b16'], fo_group['forward-b16']):.2f}x a forward of its 16 rows "
            f"({fmt_time(fo_group['forward-b16'])} s).",
        ]
    lines += [
        "",
        "## Peak memory (RSS of each process; import baseline = torch + zotune imported)",
        "",
        "| configuration | import baseline MB | peak MB | peak / inference peak of the same rows |",
        "|---|---|---|---|",
    ]
    for (q, b), g in cost.items():
        for name, r in g.items():
            if "error" in r:
                lines.append(f"| {name} (q={q}, b={b}) | - | failed | - |")
                continue
            ref = g["forward-b16"] if name == "fo-b16" else g["forward"]
            rel = "" if name.startswith("forward") else f"{ratio(r, ref, 'peak_rss_mb'):.2f}"
            if name == "prge-dual":
                rel = mark(ratio(r, ref, "peak_rss_mb"), TARGETS["train_vs_infer_rss"])
            lines.append(
                f"| {name} (q={q}, b={b}) | {r['import_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {rel} |"
            )
    if fo_group:
        g44 = cost.get((4, 4), fo_group)
        lines += [
            "",
            "P-RGE (4,4) dual peak / first-order batch-16 peak: "
            f"{mark(ratio(g44['prge-dual'], fo_group['fo-b16'], 'peak_rss_mb'), TARGETS['prge_vs_fo_rss'])}.",
        ]
    if scaling:
        lines += ["", "## Scaling of the P-RGE dual step", ""]
        for label, _, res in scaling.values():
            lines += [f"| {label} | step s | step / first | peak MB |", "|---|---|---|---|"]
            first = next(iter(res.values()))
            for name, r in res.items():
                if "error" in r:
                    lines.append(f"| {name} | failed | - | - |")
                    continue
                lines.append(f"| {name} | {fmt_time(r)} | {ratio(r, first):.2f} | {r['peak_rss_mb']:.0f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(cost: dict, scaling: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(scaling)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    names = ["forward", "prge-dual", "prge-single", "rge"]
    width = 0.2
    for k, name in enumerate(names):
        xs = [i + k * width for i in range(len(cost))]
        ys = [g.get(name, {}).get("median_s", float("nan")) for g in cost.values()]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([i + 1.5 * width for i in range(len(cost))], [f"q={q}, b={b}" for q, b in cost])
    ax.set_ylabel("step s (median)")
    ax.set_title("step time at T=64")
    ax.legend(fontsize=8)
    for ax, (key, (label, xs, res)) in zip(axes[0][1:], scaling.items()):
        ys = [r.get("median_s", float("nan")) for r in res.values()]
        ax.plot(xs, ys, "o-", label="step s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("step s")
        ax2 = ax.twinx()
        ax2.plot(xs, [r.get("peak_rss_mb", float("nan")) for r in res.values()], "s--", color="C1")
        ax2.set_ylabel("peak RSS MB", color="C1")
        ax.set_title(f"P-RGE dual vs {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="(4,4) and (16,1) only; no P-RGE single, first-order or scaling"
    )
    p.add_argument("--steps", type=int, default=5, help="measured steps per configuration")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default=None, help="result file name (default cost / cost-quick)")
    args = p.parse_args()
    name = args.name or ("cost-quick" if args.quick else "cost")
    args.command = "benchmarks/bench_cost.py" + (" --quick" if args.quick else "")
    t0 = time.perf_counter()
    settings = [(4, 4), (16, 1)] if args.quick else [(1, 16), (4, 4), (16, 1)]
    cost = {}
    for q, b in settings:
        print(f"cost q={q} b={b}", flush=True)
        cost[(q, b)] = run_group(cost_group(q, b, args.threads, full=not args.quick), args.steps)
    scaling = {}
    if not args.quick:
        for key, (label, xs, specs) in scaling_groups(args.threads).items():
            print(f"scaling {key}", flush=True)
            scaling[key] = (label, xs, run_group(specs, args.steps))
    m = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(report(cost, scaling, m, args, time.perf_counter() - t0))
    plot(cost, scaling, RESULTS / f"{name}.png")
    raw = {
        "machine": m,
        "cost": {f"{q},{b}": g for (q, b), g in cost.items()},
        "scaling": {k: v[2] for k, v in scaling.items()},
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=1))
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
