"""The same P-RGE step in eager PyTorch and in exported ExecuTorch programs (fp32 XNNPACK, 8da4w)
on the embedded SmolLM2-135M at the demo shapes (q=4, b=4, T=64, C=2; LoRA-FA r=16 on every
linear of the decoder blocks).

Each export runs in its own process (`export` subcommand: time and peak RSS), all at the same
time; then eager and every program step interleaved, one process each (benchmarks/lockstep.py).
Programs are kept in --out and reused when their sidecar says they were exported by this zotune
version with these shapes (--reexport forces a new export). Writes benchmarks/results/<name>.md
and .json.

    .venv/bin/python benchmarks/bench_engines.py [--quantize none 8da4w] [--steps 7]
    .venv/bin/python benchmarks/bench_engines.py export --quantize none --out DIR
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from lockstep import fmt_time, machine, machine_line, run_group

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
Q, B, T, C = 4, 4, 64, 2
RANK, ALPHA = 16, 32.0
MODEL = "smollm2-135m"
TARGET = {"none": 0.5, "8da4w": 0.35}


def pte_name(quantize: str) -> str:
    return f"smollm2-{'fp32' if quantize == 'none' else quantize}.pte"


def cmd_export(args) -> None:
    import torch

    from zotune.adapters.lora import LoRAAdapter
    from zotune.engines.executorch import export_program
    from zotune.engines.export_common import StepSpec
    from zotune.loss import ClassificationLoss
    from zotune.models import load_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, _, _ = load_model(MODEL)
    adapter = LoRAAdapter(model, rank=RANK, alpha=ALPHA, targets=["all-linear"])
    quant = None if args.quantize == "none" else args.quantize
    out = Path(args.out) / pte_name(args.quantize)
    t0 = time.perf_counter()
    rep = export_program(
        model,
        adapter,
        ClassificationLoss(),
        StepSpec(
            q=Q, b=B, seq_len=T, n_choices=C, quantize=quant, model_name=MODEL, tolerance=args.tolerance
        ),
        out,
        log=lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True),
    )
    res = {
        "path": str(out),
        "size_mb": rep.size / 2**20,
        "seconds": rep.seconds,
        "check": rep.check,
        "portable_ops": rep.portable_ops,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out.with_name(out.name + ".export.json").write_text(json.dumps(res, indent=1))
    print("@@" + json.dumps(res), flush=True)


def start_export(quantize: str, out: Path, threads: int, tolerance: float | None):
    cmd = [
        sys.executable,
        __file__,
        "export",
        "--quantize",
        quantize,
        "--out",
        str(out),
        "--threads",
        str(threads),
    ]
    if tolerance is not None:
        cmd += ["--tolerance", str(tolerance)]
    log = (out / f"export-{quantize}.log").open("w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log


def finish_export(proc, log) -> dict:
    code = proc.wait()
    log.close()
    text = Path(log.name).read_text()
    lines = [line for line in text.splitlines() if line.startswith("@@")]
    if code != 0 or not lines:
        tail = [line for line in text.strip().splitlines() if line.strip()]
        return {"error": tail[-1] if tail else f"exit status {code}"}
    return json.loads(lines[-1][2:])


def reusable(path: Path) -> bool:
    import importlib.metadata as md

    sidecar = path.with_name(path.name + ".json")
    if not (path.is_file() and sidecar.is_file()):
        return False
    meta = json.loads(sidecar.read_text())
    return (
        meta.get("zotune") == md.version("zotune")
        and (meta["q"], meta["b"], meta["seq_len"]) == (Q, B, T)
        and path.stat().st_size == meta.get("size")
    )


def report(exports: dict, steps: dict, args, m: dict) -> str:
    eager = steps["eager"]
    lines = [
        "# Engines: the P-RGE step in eager PyTorch and in ExecuTorch (SmolLM2-135M)",
        "",
        f"Command: `benchmarks/bench_engines.py --quantize {' '.join(args.quantize)}`. Machine: "
        f"{machine_line(m)}. {args.threads} threads per engine (torch / XNNPACK threadpool); "
        f"q={Q}, b={B}, T={T}, LoRA-FA r={RANK} on all linears; {args.steps} measured steps after "
        "1 warm-up, engines interleaved, one process each; median (min-max) seconds.",
        "",
        "| engine | step s | step / eager (target) | peak RSS MB | file MB | "
        "export s (lowering s), peak RSS | "
        "parity after one step vs eager: theta, loss, 2 eps g; update vs its own g |",
        "|---|---|---|---|---|---|---|",
        f"| eager PyTorch | {fmt_time(eager)} | 1.00 | {eager.get('peak_rss_mb', float('nan')):.0f} "
        "| - | - | - |",
    ]
    for qz in args.quantize:
        e, r = exports.get(qz, {}), steps.get(qz, {"error": "not run"})
        label = "ExecuTorch fp32 XNNPACK" if qz == "none" else f"ExecuTorch {qz}"
        if "error" in r or "error" in e:
            lines.append(f"| {label} | failed: {(e.get('error') or r.get('error', ''))[-200:]} | | | | | |")
            continue
        ratio = r["median_s"] / eager["median_s"]
        verdict = "meets" if ratio <= TARGET[qz] else "misses"
        secs = e.get("seconds", {})
        peak = e.get("peak_rss_mb", float("nan"))
        peak_s = f"{peak / 1024:.1f} GB" if peak == peak else "peak not recorded"
        export_s = (
            f"{secs['total']:.0f} ({secs['lower']:.0f}), {peak_s}" if "total" in secs else "not recorded"
        )
        check = e.get("check", {})
        parity = ", ".join(f"{check[k]:.1e}" for k in ("theta", "loss", "loss_diff", "update") if k in check)
        lines.append(
            f"| {label} | {fmt_time(r)} | {ratio:.2f} ({verdict} ≤ {TARGET[qz]}) | "
            f"{r['peak_rss_mb']:.0f} | {e['size_mb']:.0f} | {export_s} | {parity} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    e = sub.add_parser("export", help="one export, in this process")
    e.add_argument("--quantize", default="none", choices=["none", "8da4w"])
    e.add_argument("--out", required=True)
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--tolerance", type=float, default=None)
    p.add_argument("--quantize", nargs="+", default=["none", "8da4w"], choices=["none", "8da4w"])
    p.add_argument("--out", default=str(ROOT / ".cache" / "bench-engines"))
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reexport", action="store_true")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="fp32 export parity tolerance, every metric (default: the engine's own)",
    )
    p.add_argument(
        "--tolerance-8da4w",
        type=float,
        default=None,
        help="8da4w export parity tolerance, every metric (default: the engine's own)",
    )
    p.add_argument("--name", default="engines")
    args = p.parse_args()
    if args.cmd == "export":
        return cmd_export(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exports, pending = {}, {}
    for qz in args.quantize:
        path = out / pte_name(qz)
        if reusable(path) and not args.reexport:
            record = path.with_name(path.name + ".export.json")  # how it was exported, if known
            meta = json.loads(path.with_name(path.name + ".json").read_text())
            exports[qz] = (
                json.loads(record.read_text())
                if record.is_file()
                else {
                    "path": str(path),
                    "size_mb": path.stat().st_size / 2**20,
                    "check": meta.get("check", {}),
                    "seconds": {},
                }
            )
            continue
        pending[qz] = args.tolerance if qz == "none" else args.tolerance_8da4w
    # Exports run at the same time, one thread each: lowering is mostly single-threaded Python
    # (XNNPACK's passes over the graph), so two in parallel take about as long as the slower one.
    threads = max(1, args.threads // max(1, len(pending)))
    started = {qz: start_export(qz, out, threads, tol) for qz, tol in pending.items()}
    for qz, (_, log) in started.items():
        print(f"exporting {qz} ({threads} thread(s)), log in {log.name} ...", flush=True)
    for qz, (proc, log) in started.items():
        exports[qz] = finish_export(proc, log)
        print(f"  {qz}: {json.dumps(exports[qz])[:400]}", flush=True)
    specs = {"eager": {"mode": "prge", "q": Q, "b": B, "T": T, "threads": args.threads}}
    for qz, ex in exports.items():
        if "error" not in ex:
            specs[qz] = {"mode": "pte", "pte": ex["path"], "b": B, "T": T, "threads": args.threads}
    steps = run_group(specs, args.steps)
    m = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(report(exports, steps, args, m))
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"machine": m, "exports": exports, "steps": steps}, indent=1)
    )
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
