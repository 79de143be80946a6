"""Is a 4-bit base sound for zeroth-order training? g from the int4 ONNX program against g from
the fp32 ONNX program, step by step along the fp32 program's trajectory on the demo's data.

    python benchmarks/onnx_int4_g.py [--config configs/demo.yaml] [--steps 20] [--eps 1e-2] \
        [--quantize int4|int4-zp|int4-hqq] [--block-size 32]

Both programs are exported first, each by `zotune export --engine onnx` in its own process
(export wall time and the report's stage times recorded). Then, for each step, the int4 program
is set to the fp32 program's theta and momentum buffer (re-synced), both run the same step
(same batch, seed, lr, eps), and the fp32 program's update carries the trajectory on. The
result is the Pearson correlation of the q * steps values of g, with sign agreement and the
relative error, written to benchmarks/results/onnx-<quantize>-b<block size>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export(cfg_path: str, out: Path, threads: int, quantize, block: int, overrides: list[str], layers=None):
    cmd = [
        sys.executable,
        "-m",
        "zotune.cli",
        "export",
        "--engine",
        "onnx",
        "--config",
        cfg_path,
        "--out",
        str(out),
        "--train.threads",
        str(threads),
        *overrides,
    ]
    if quantize:
        cmd += ["--quantize", quantize, "--block-size", str(block)]
        cmd += ["--int4-layers", layers] if layers else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"export failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout[proc.stdout.index("\n{") + 1 :])
    return {
        "wall_s": wall,
        "seconds": report["seconds"],
        "check": report["check"],
        "size_mb": sum(Path(str(out) + x).stat().st_size for x in ("", ".eval.onnx", ".weights.safetensors"))
        / 2**20,
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    return num / den


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--quantize", default="int4", choices=["int4", "int4-zp", "int4-hqq"])
    p.add_argument("--dir", default=str(ROOT / ".cache" / "onnx-int4"))
    p.add_argument("--reuse", action="store_true", help="keep programs already exported")
    p.add_argument("--int4-layers", default=None, help="quantize only the base linears matching this regex")
    p.add_argument(
        "--out", default=None, help="results file stem (default benchmarks/results/onnx-<quantize>-b<block>)"
    )
    args = p.parse_args()
    tag = f"{args.quantize}-b{args.block_size}"
    if args.int4_layers:  # the layer choice in the file names, word characters only
        tag += "-" + re.sub(r"\W+", "", args.int4_layers)
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"onnx-{tag}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    torch.set_num_threads(args.threads)
    from zotune.config import load_config
    from zotune.engines.ort import OrtProgram, set_threads
    from zotune.loss import batch_tensors
    from zotune.models import load_tokenizer
    from zotune.rng import step_seed
    from zotune.train.loop import batch_indices
    from zotune.train.run import encode_splits
    from zotune.train.schedule import lr_at

    overrides = ["--optim.eps", str(args.eps)]
    cfg = load_config(args.config, overrides)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": folder / "fp32.onnx", "int4": folder / f"{tag}.onnx"}
    exports = {}
    for name, path in paths.items():
        if args.reuse and path.is_file():
            continue
        print(f"exporting {name} ...", flush=True)
        exports[name] = export(
            args.config,
            path,
            args.threads,
            args.quantize if name == "int4" else None,
            args.block_size,
            overrides,
            args.int4_layers if name == "int4" else None,
        )
        print(f"  {exports[name]['wall_s']:.1f} s, {exports[name]['size_mb']:.0f} MB", flush=True)

    set_threads(args.threads)
    progs = {name: OrtProgram.load(path) for name, path in paths.items()}
    splits = encode_splits(cfg, load_tokenizer(cfg.model.name))
    o, t = cfg.optim, cfg.train
    g = {"fp32": [], "int4": []}
    step_s = {"fp32": [], "int4": []}
    losses = {"fp32": [], "int4": []}
    for k in range(args.steps):
        idx = batch_indices(len(splits.train), o.batch_size, k, t.seed)
        batch = batch_tensors(splits.train.index(idx), splits.kind)
        seed, lr = step_seed(t.seed, k), lr_at(k, t.steps, o.lr, o.schedule, o.warmup_steps, o.min_lr_ratio)
        progs["int4"].set_lora(progs["fp32"].get_lora_flat())  # re-sync theta (and momentum)
        if progs["fp32"].momentum:
            progs["int4"].set_momentum(progs["fp32"].pair.get_velocity())
        for name in ("int4", "fp32"):  # fp32 last: its update carries the trajectory
            t0 = time.perf_counter()
            loss, gk = progs[name].train_step(seed, lr, o.eps, batch)
            step_s[name].append(time.perf_counter() - t0)
            g[name] += [float(x) for x in gk]
            losses[name].append(loss)
        print(
            f"step {k + 1}: g fp32 {[round(x, 3) for x in g['fp32'][-o.q :]]} "
            f"int4 {[round(x, 3) for x in g['int4'][-o.q :]]}",
            flush=True,
        )

    a, b = g["fp32"], g["int4"]
    err = (sum((x - y) ** 2 for x, y in zip(a, b)) / sum(x * x for x in a)) ** 0.5
    result = {
        "config": args.config,
        "steps": args.steps,
        "eps": args.eps,
        "q": o.q,
        "b": o.batch_size,
        "T": cfg.data.max_length,
        "quantize": args.quantize,
        "block_size": args.block_size,
        "threads": args.threads,
        "pearson_g": pearson(a, b),
        "sign_agreement": sum((x > 0) == (y > 0) for x, y in zip(a, b)) / len(a),
        "relative_l2_error_g": err,
        "loss_abs_diff_max": max(abs(x - y) for x, y in zip(losses["fp32"], losses["int4"])),
        "step_s_median": {k: statistics.median(v) for k, v in step_s.items()},
        "exports": exports,
        "g": g,
        "loss": losses,
        "machine": {
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
        },
        "command": "python benchmarks/onnx_int4_g.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("g", "loss")}, indent=1))


if __name__ == "__main__":
    main()
