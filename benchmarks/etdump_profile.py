"""Where the time of one method of a zotune ExecuTorch program goes, from the runtime's own ETDump
(per-instruction event timings): XNNPACK delegate ops vs portable (non-delegated) operators,
aggregated by operator name. Prints a markdown table and writes it to --out.

    .venv/bin/python benchmarks/etdump_profile.py PROGRAM.pte [--method train_step] [--runs 3]
        [--threads 2] [--out benchmarks/results/etdump.md] [--etdump KEEP.etdp]

theta is set to zeros through set_lora first (same loaded program: the methods share it). With
--runs > 1 the first run is a warm-up and is left out. Inputs are synthetic (random token ids).
Rows: "portable: <op>" is the kernel time (native_call_<op>); "xnnpack: <op>" is XNNPACK's own
per-operator timing (whole microseconds, summed over the op's instances, "#N" stripped); the
"(...)" rows hold what lies between: operator dispatch, delegate calls outside XNNPACK's timed
ops (input/output setup, profiler bookkeeping, sub-microsecond remainders), and the method's own
work. Together the rows add up to the method time (Method::execute).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from zotune.engines.export_common import read_sidecar

RESULTS = Path(__file__).resolve().parent / "results"


def method_inputs(method: str, meta: dict, run: int) -> list[torch.Tensor]:
    """Synthetic inputs with the shapes the program was exported for."""
    rows, T = (meta["b"] if method == "train_step" else meta["eval_batch"]), meta["seq_len"]
    ids = torch.randint(0, 1000, (rows, T), generator=torch.Generator().manual_seed(0))
    choices = torch.tensor([[100 * (c + 1) for c in range(meta["n_choices"])]] * rows)
    batch = [ids, torch.ones_like(ids), torch.arange(T).repeat(rows, 1), choices]
    if method == "train_step":  # seed, lr, eps, batch, labels
        return [
            torch.tensor([run]),
            torch.tensor([1e-3]),
            torch.tensor([1e-2]),
            *batch,
            torch.zeros(rows, dtype=torch.int64),
        ]
    if method == "set_lora":
        return [torch.zeros(meta["numel"], dtype=getattr(torch, meta.get("dtype", "float32")))]
    return batch if method == "forward" else []


def aggregate(blocks) -> tuple[list[float], dict[str, list], dict[str, float]]:
    """Sum the Inspector's events over all runs -> (ms per run, {row: [ms, count]}, totals).
    The Inspector groups runs with the same event signature into one block; perf_data.raw holds
    one duration (ms) per run of that block."""
    rows: dict[str, list] = defaultdict(lambda: [0.0, 0])
    tot: dict[str, float] = defaultdict(float)
    n: dict[str, int] = defaultdict(int)
    per_run: list[float] = []
    for e in (e for block in blocks for e in block.events if e.perf_data is not None):
        raw = e.perf_data.raw
        if e.is_delegated_op:  # logged by the delegate itself (XNNPACK's profiler)
            key, bucket = "xnnpack: " + re.sub(r" #\d+$", "", e.name), "inner"
        elif e.name.startswith("native_call_"):  # the portable kernel, inside OPERATOR_CALL
            key, bucket = "portable: " + e.name[len("native_call_") :], "kernel"
        else:  # Method::execute, OPERATOR_CALL, DELEGATE_CALL
            key, bucket = None, e.name
            if e.name == "Method::execute":
                per_run.extend(raw)
        tot[bucket], n[bucket] = tot[bucket] + sum(raw), n[bucket] + len(raw)
        if key:
            rows[key] = [rows[key][0] + sum(raw), rows[key][1] + len(raw)]
    gaps = [
        ("xnnpack: (delegate call, outside timed ops)", "DELEGATE_CALL", "inner"),
        ("portable: (operator dispatch)", "OPERATOR_CALL", "kernel"),
    ]
    for key, outer, inner in gaps:
        if n[outer]:  # the outer scope's time not covered by the events inside it
            rows[key] = [tot[outer] - tot[inner], n[outer]]
    rows["(method, outside operator/delegate calls)"] = [
        tot["Method::execute"] - tot["OPERATOR_CALL"] - tot["DELEGATE_CALL"],
        len(per_run),
    ]
    return per_run, dict(rows), tot


def profile(path: Path, method: str, runs: int, threads: int, keep: str | None, tmp: Path):
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)  # XNNPACK's (and the optimized ops') pool
    meta = read_sidecar(path, "executorch")
    program = Runtime.get().load_program(path, enable_etdump=True)  # no debug buffer: timings only
    methods = {m: program.load_method(m) for m in {"set_lora", "get_lora", method}}
    methods["set_lora"].execute(method_inputs("set_lora", meta, 0))  # theta is not serialized
    etdump = Path(keep) if keep else tmp / "profile.etdp"

    def flush():  # writing the ETDump also empties it: this drops load, set_lora and warm-up
        program.write_etdump_result_to_file(str(etdump), str(tmp / "debug.bin"))

    if runs > 1:
        methods[method].execute(method_inputs(method, meta, 0))
    flush()
    walls, losses = [], []
    for i in range(max(1, runs - 1)):
        inputs, t0 = method_inputs(method, meta, i + 1), time.perf_counter()
        out = methods[method].execute(inputs)
        walls.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(out[0]) if method == "train_step" else 0.0)
    flush()
    check = ""
    if method == "train_step":  # set_lora and train_step must share theta: it has to move
        theta = methods["get_lora"].execute([])[0]
        ok = all(map(math.isfinite, losses)) and bool(theta.abs().sum() > 0)
        check = (
            f"check: loss per run {', '.join(f'{x:.4f}' for x in losses)}; theta nonzero "
            f"after training: {int((theta != 0).sum())}/{theta.numel()} -> "
            f"{'ok' if ok else 'FAILED'}"
        )
    with warnings.catch_warnings():  # "Output Buffer not found": no debug buffer, as intended
        warnings.simplefilter("ignore")
        blocks = Inspector(etdump_path=str(etdump)).event_blocks
    return meta, aggregate(blocks), walls, check


def report(args, meta, agg, walls, check) -> str:
    per_run, rows, tot = agg
    n, total = len(per_run), tot["Method::execute"] / len(per_run)
    inside, portable = tot["DELEGATE_CALL"], tot["OPERATOR_CALL"]
    pct = lambda ms: f"{100 * ms / n / total:.1f}%"  # noqa: E731  (ms summed over the n runs)
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])
    top, rest = ranked[:25], [v for _, v in ranked[25:]]
    if rest:
        top.append((f"other ({len(rest)} rows)", [sum(v[0] for v in rest), sum(v[1] for v in rest)]))
    lines = [
        f"# ETDump profile: {args.program.name} :: {args.method}",
        "",
        f"q={meta['q']} b={meta['b']} T={meta['seq_len']} C={meta['n_choices']} "
        f"eval_batch={meta['eval_batch']}, threads {args.threads}, {n} profiled run(s)"
        f"{' after 1 warm-up' if args.runs > 1 else ' (cold, no warm-up)'}",
        "",
        f"method time per run (Method::execute): mean {total:.3f} ms (min {min(per_run):.3f},"
        f" median {statistics.median(per_run):.3f}, max {max(per_run):.3f}); wall per run "
        f"(Python, ETDump on): mean {statistics.mean(walls):.3f} ms",
        "",
        f"inside delegate calls (XNNPACK): {inside / n:.3f} ms ({pct(inside)}); portable "
        f"operator calls: {portable / n:.3f} ms ({pct(portable)}); rest of the method: "
        f"{pct(tot['Method::execute'] - inside - portable)}",
        "",
        *([check, ""] if check else []),
        "| # | event | ms/run | count/run | share |",
        "|---:|---|---:|---:|---:|",
    ]
    for i, (name, (ms, count)) in enumerate(top, 1):
        lines.append(f"| {i} | {name} | {ms / n:.3f} | {count / n:g} | {pct(ms)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("program", type=Path)
    p.add_argument(
        "--method", default="train_step", choices=["train_step", "forward", "get_lora", "set_lora"]
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "etdump.md")
    p.add_argument("--etdump", default=None, help="also keep the raw ETDump at this path")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="etdump_") as tmp:
        text = report(
            args, *profile(args.program, args.method, args.runs, args.threads, args.etdump, Path(tmp))
        )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
