"""Engine benchmark on the embedded SmolLM2-135M: ExecuTorch export cost and step time vs eager.

    python benchmarks/bench_engines.py all --out /tmp/zotune-bench [--quantize none 8da4w]
    python benchmarks/bench_engines.py export --quantize none --out DIR     # one export
    python benchmarks/bench_engines.py step --engine pte --pte DIR/smollm2-fp32.pte
    python benchmarks/bench_engines.py step --engine eager

Demo shapes: q=4, b=4, T=64, C=2; LoRA-FA r=16 alpha=32 on every linear of the decoder blocks.
Each export and each step measurement runs in its own fresh process (peak RSS via ru_maxrss, with
the RSS after imports reported beside it); step runs are interleaved between engines over
several rounds and reported as medians (DESIGN.md section 8).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

Q, B, T, C = 4, 4, 64, 2
RANK, ALPHA = 16, 32.0
MODEL = "smollm2-135m"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _batch(tokenizer, rows: int):
    import torch

    texts = ["a gripping, beautifully shot film with a great cast", "dull and far too long",
             "I would happily watch it again", "the plot makes no sense at all"]
    prompts = [f"Review: {texts[i % len(texts)]}\nSentiment (positive or negative):"
               for i in range(rows)]
    enc = tokenizer(prompts, padding="max_length", max_length=T, truncation=True,
                    return_tensors="pt")
    ids, am = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
    pos = (am.cumsum(1) - 1).clamp_min(0)
    words = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" positive", " negative")]
    choice = torch.tensor([words] * rows, dtype=torch.int64)
    labels = torch.tensor([i % 2 for i in range(rows)], dtype=torch.int64)
    return ids, am, pos, choice, labels


def _model_and_adapter():
    from zotune.adapters.lora import LoRAAdapter
    from zotune.models import load_model

    model, tokenizer, _ = load_model(MODEL)
    adapter = LoRAAdapter(model, rank=RANK, alpha=ALPHA, targets=["all-linear"])
    return model, tokenizer, adapter


class FlatPRGEStep:
    """Prototype of a proposed PRGEStep variant (not used by zotune itself): with fused noise,
    perturb and update theta as ONE flat vector and only slice it per layer. Bitwise the same
    as PRGEStep (every element sees the same ops), but the exported graph loses about 35 ops
    per adapted layer, which is most of the lowering time."""

    def __new__(cls, model, adapter, loss, q, dual=True, noise="normal"):
        import torch
        import torch.nn as nn

        from zotune.estimators.zo import projected_gradient
        from zotune.loss import per_replica
        from zotune.rng import noise as draw_noise

        class Flat(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            @torch.no_grad()
            def forward(self, seed, lr, eps, *batch):
                trained = adapter.trained
                theta = torch.cat([t.tensor.reshape(-1) for t in trained])  # [N]
                z = draw_noise(seed, 0, q * adapter.numel, noise, theta.dtype).reshape(q, -1)

                def losses_for(signs):
                    stack = torch.cat([theta + (s * eps) * z for s in signs])  # [R, N]
                    n_rep = stack.shape[0]
                    stacks = {t.name.rsplit(".", 1)[0]: (None, stack[:, t.offset: t.offset
                              + t.tensor.numel()].reshape(n_rep, *t.tensor.shape)) for t in trained}
                    tiled = [b.repeat(n_rep, *([1] * (b.dim() - 1))) for b in batch]
                    adapter.set_replicas(stacks)
                    try:
                        nll, count = loss.rows(model, *tiled)
                    finally:
                        adapter.set_replicas(None)
                    return per_replica(nll, count, n_rep)

                losses = losses_for((1, -1)) if dual else torch.cat([losses_for((1,)),
                                                                     losses_for((-1,))])
                g = projected_gradient(losses[:q], losses[q:], eps)
                acc = z[0] * g[0].to(z.dtype)
                for i in range(1, q):
                    acc = acc + z[i] * g[i].to(z.dtype)
                new = theta - lr * (acc / q)
                for t in trained:
                    t.tensor.copy_(new[t.offset: t.offset + t.tensor.numel()]
                                   .reshape(t.tensor.shape))
                return losses.mean(), g

        return Flat()


def cmd_export(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from zotune.engines.executorch import export_program
    from zotune.loss import ClassificationLoss

    t0 = time.perf_counter()
    model, tokenizer, adapter = _model_and_adapter()
    load_s = time.perf_counter() - t0
    rss_loaded = _current_rss_mb()
    quant = None if args.quantize == "none" else args.quantize
    out = Path(args.out) / (f"smollm2-{args.quantize if quant else 'fp32'}"
                            f"{'-flat' if args.step == 'flat' else ''}.pte")
    t0 = time.perf_counter()
    rep = export_program(model, adapter, ClassificationLoss(), q=Q, b=B, seq_len=T, n_choices=C,
                         quantize=quant, out_path=out, model_name=MODEL,
                         step_factory=FlatPRGEStep if args.step == "flat" else None,
                         tolerance=args.tolerance,
                         log=lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True))
    res = {"what": "export", "quantize": args.quantize, "step": args.step, "path": str(out),
           "size_mb": rep.size / 2**20,
           "seconds": rep.seconds, "check": rep.check, "portable_ops": rep.portable_ops,
           "model_load_s": load_s, "rss_after_load_mb": rss_loaded, "peak_rss_mb": _rss_mb(),
           "n_trained": adapter.numel, "n_layers": len(adapter.layers)}
    print(json.dumps(res), flush=True)
    return res


def cmd_step(args) -> dict:
    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    rss_start = _current_rss_mb()
    if args.engine == "pte":
        from transformers import AutoTokenizer  # noqa: F401  (tokenizer only)

        from zotune.engines.executorch import PteProgram
        from zotune.models.loader import load_tokenizer

        tokenizer = load_tokenizer(MODEL)
        batch = _batch(tokenizer, B)
        if args.threads:  # XNNPACK's threadpool (default: one thread per core)
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
            _unsafe_reset_threadpool(args.threads)
        t0 = time.perf_counter()
        prog = PteProgram.load(args.pte)
        load_s = time.perf_counter() - t0
        rss_ready = _current_rss_mb()

        def step(i):
            return prog.train_step(1000 + i, 3e-3, 1e-2, batch)
    else:
        from zotune.estimators.prge import PRGEStep
        from zotune.loss import ClassificationLoss

        t0 = time.perf_counter()
        model, tokenizer, adapter = _model_and_adapter()
        load_s = time.perf_counter() - t0
        batch = _batch(tokenizer, B)
        prge = PRGEStep(model, adapter, ClassificationLoss(), Q, fused_noise=args.fused_noise)
        rss_ready = _current_rss_mb()

        def step(i):
            loss, g = prge(torch.tensor([1000 + i], dtype=torch.int64), 3e-3, 1e-2, *batch)
            return float(loss), g

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, _ = step(i)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
            losses.append(loss)
    res = {"what": "step", "engine": args.engine, "pte": args.pte, "fused_noise": args.fused_noise,
           "median_s": statistics.median(times), "times_s": times, "losses": losses,
           "load_s": load_s, "rss_start_mb": rss_start, "rss_ready_mb": rss_ready,
           "peak_rss_mb": _rss_mb(), "threads": threads}
    print(json.dumps(res), flush=True)
    return res


def _run(argv: list[str], log: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(argv)}\n{proc.stdout}\n{proc.stderr[-4000:]}\n")
    if proc.returncode != 0:
        return {"what": argv[0], "argv": argv, "error": proc.stderr[-2000:],
                "wall_s": time.perf_counter() - t0}
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    res = json.loads(last)
    res["wall_s"] = time.perf_counter() - t0
    return res


def cmd_all(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    results = []
    ptes = {}
    for qz in args.quantize:
        if args.skip_export and (out / f"smollm2-{qz if qz != 'none' else 'fp32'}.pte").exists():
            ptes[qz] = str(out / f"smollm2-{qz if qz != 'none' else 'fp32'}.pte")
            continue
        res = _run(["export", "--quantize", qz, "--out", str(out)], log)
        print(json.dumps(res), flush=True)
        results.append(res)
        if "error" not in res:
            ptes[qz] = res["path"]
    # Interleaved step rounds, each engine in its own fresh process.
    if args.flat:
        for p in list(ptes.values()):
            flat = p.replace(".pte", "-flat.pte")
            if Path(flat).exists():
                ptes[f"{p}-flat"] = flat
    configs = [("eager", None)] + [("pte", p) for p in ptes.values()]
    per_config: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for engine, pte in configs:
            argv = ["step", "--engine", engine, "--steps", str(args.steps),
                    "--threads", str(args.threads)]
            if pte:
                argv += ["--pte", pte]
            res = _run(argv, log)
            print(json.dumps({k: v for k, v in res.items() if k != "times_s"}), flush=True)
            per_config.setdefault(f"{engine}:{Path(pte).name if pte else 'prge'}", []).append(res)
    summary = {}
    for name, runs in per_config.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            summary[name] = {"error": runs[0].get("error", "")[-500:]}
            continue
        all_times = [t for r in ok for t in r["times_s"]]
        summary[name] = {"median_step_s": statistics.median(all_times), "n_steps": len(all_times),
                         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
                         "rss_after_imports_mb": statistics.median(r["rss_start_mb"] for r in ok),
                         "load_s": statistics.median(r["load_s"] for r in ok)}
    base = summary.get("eager:prge", {}).get("median_step_s")
    for v in summary.values():
        if base and "median_step_s" in v:
            v["vs_eager"] = v["median_step_s"] / base
    final = {"exports": results, "steps": summary}
    (out / f"bench-{args.threads or 'all'}threads.json").write_text(json.dumps(final, indent=1))
    print(json.dumps(summary, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--quantize", default="none", choices=["none", "8da4w"])
    e.add_argument("--out", default="/tmp/zotune-bench")
    e.add_argument("--tolerance", type=float, default=None,
                   help="parity tolerance (default: the engine's, 1e-5 fp32 / 5e-3 8da4w)")
    e.add_argument("--step", default="prge", choices=["prge", "flat"],
                   help="flat: export the proposed flat-theta step variant (prototype)")
    s = sub.add_parser("step")
    s.add_argument("--engine", choices=["pte", "eager"], required=True)
    s.add_argument("--pte")
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--fused-noise", action="store_true")
    s.add_argument("--threads", type=int, default=0, help="0: one per core")
    a = sub.add_parser("all")
    a.add_argument("--out", default="/tmp/zotune-bench")
    a.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "8da4w"])
    a.add_argument("--rounds", type=int, default=2)
    a.add_argument("--steps", type=int, default=5)
    a.add_argument("--skip-export", action="store_true", help="reuse .pte files already in --out")
    a.add_argument("--threads", type=int, default=0, help="threads per step process (0: cores)")
    a.add_argument("--flat", action="store_true", help="also time the -flat.pte variants")
    args = p.parse_args()
    {"export": cmd_export, "step": cmd_step, "all": cmd_all}[args.cmd](args)


if __name__ == "__main__":
    main()
