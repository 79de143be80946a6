"""Where the time of one eager P-RGE step goes, against a plain forward of the same 2qb rows.

One process, two copies of SmolLM2-135M (plain, adapted), synthetic rows of T tokens. Every round
times, in turn: the plain forward, the whole step, and each phase of the step run on its own
(draw z, the replica forward in which each layer builds its perturbed stacks, the update), so
machine noise hits all alike; medians over the rounds. Then torch-profiler passes of the
replica forward and of the plain forward (three each, in turn, every operator at its fastest),
grouped by operator and input shape, split the replica forward's extra time into the base GEMMs
and the LoRA terms.

    .venv/bin/python benchmarks/profile_step.py [--q 4 --b 4 --T 64 --threads 2 --rounds 7]

Writes benchmarks/results/profile-q<q>-b<b>.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from worker import _batch

from zotune.config import Config
from zotune.engines.eager import EagerEngine
from zotune.estimators.prge import replica_stacks, stacked_losses
from zotune.estimators.zo import apply_update, draw, estimate
from zotune.loss import ClassificationLoss
from zotune.models import load_model
from zotune.models.loader import load_tokenizer
from zotune.runtime import keep_heap

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def op_times(fn, steps: int = 2) -> dict[tuple[str, str], float]:
    """Self CPU seconds per (operator, input shapes), per call of fn."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            fn()
    out: dict[tuple[str, str], float] = defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        out[(e.key, str(e.input_shapes))] += e.self_cpu_time_total / steps / 1e6
    return out


def classify(op: str, shapes: str, rank: int) -> str:
    """Which part of a LoRA forward an operator call belongs to (by its input shapes)."""
    if op in ("aten::mm", "aten::addmm"):
        return "LoRA x·Aᵀ GEMMs" if shapes.rstrip("]").endswith(f", {rank}") else "base GEMMs"
    if op in ("aten::baddbmm", "aten::baddbmm_", "aten::bmm"):
        return "LoRA (x·Aᵀ)·Bᵀ accumulated into y (baddbmm_)"
    first = shapes[1:].split("]", 1)[0]  # the first input's shape
    if op in ("aten::mul", "aten::add_") and first.endswith(f", {rank}"):
        return "perturbed B stacks (built in each layer)"
    if op in ("aten::copy_", "aten::repeat"):
        return "copies"
    return "other operators"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--name", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_heap()  # as the zotune command does
    q, b = args.q, args.b
    tok = load_tokenizer(MODEL)
    choice = [tok.encode(w, add_special_tokens=False)[0] for w in (" positive", " negative")]

    plain, _, _ = load_model(MODEL)
    loss = ClassificationLoss()
    rows = _batch(2 * q * b, args.T, len(tok), choice)
    adapted, _, _ = load_model(MODEL)
    cfg = Config()
    cfg.optim.q, cfg.optim.batch_size, cfg.optim.dual = q, b, True
    engine = EagerEngine(adapted, cfg, "classification")
    adapter, batch = engine.params, _batch(b, args.T, len(tok), choice)
    seed, eps, lr = torch.tensor([7], dtype=torch.int64), cfg.optim.eps, cfg.optim.lr
    signs = (1, -1)
    noise_kind = cfg.optim.noise
    z_list = draw(seed, adapter.layout, adapter.tensors()[0], q, noise_kind, fused=True)  # as the step
    zs = dict(zip(adapter.layout.names, z_list))
    stacks = replica_stacks(adapter, zs.__getitem__, q, eps, signs)
    g = torch.full((q,), 0.1)
    step_i = itertools.count()

    @torch.no_grad()
    def plain_forward():
        return loss.logits(plain, *rows[:4])

    @torch.no_grad()
    def replica_forward():
        return stacked_losses(adapted, adapter, engine.loss, stacks, 2 * q, batch)

    phases = {
        "plain forward (2qb rows)": plain_forward,
        "P-RGE step": lambda: engine.step(batch, next(step_i), lr, eps),
        "  draw z": lambda: draw(seed, adapter.layout, adapter.tensors()[0], q, noise_kind, fused=True),
        "  replica forward": replica_forward,
        "  update": lambda: apply_update(
            adapter.tensors(), [estimate(z, g) for z in z_list], 0.0, cfg.optim.momentum, engine.velocity
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in phases}
    for fn in phases.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for k, fn in phases.items():
            times[k].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd = med["plain forward (2qb rows)"]

    out = [
        f"# Profile of the eager P-RGE dual step (q={q}, b={b}, T={args.T}, {args.threads} "
        f"threads, SmolLM2-135M, LoRA-FA r={cfg.adapter.rank}, all linear layers)",
        "",
        f"Command: `benchmarks/profile_step.py --q {q} --b {b} --T {args.T} --threads "
        f"{args.threads} --rounds {args.rounds}`. One process; every round times each row in "
        "turn; medians (min-max) over the rounds, and each as a share of the plain forward.",
        "",
        "| phase | seconds | / plain forward |",
        "|---|---|---|",
    ]
    for k, v in times.items():
        out.append(
            f"| {k.strip() if not k.startswith('  ') else '&nbsp;&nbsp;' + k.strip()} | "
            f"{med[k]:.3f} ({min(v):.3f}-{max(v):.3f}) | {med[k] / fwd:.3f} |"
        )
    parts = sum(med[k] for k in phases if k.startswith("  "))
    out += [
        "",
        f"Sum of the phases / step: {parts / med['P-RGE step']:.2f} (the rest is tiling the "
        "batch, the loss reduction and Python).",
        "",
    ]

    # Operator split of the replica forward against the plain forward.
    # Profiled three times in turn, each (operator, shapes) at its fastest: single profiled runs on
    # this shared machine swing by up to 1.7x in either model, which would swamp a 10 % split.
    runs: tuple[list, list] = ([], [])
    for _ in range(3):
        runs[0].append(op_times(plain_forward))
        runs[1].append(op_times(replica_forward))
    ops_plain, ops_rep = ({k: min(r.get(k, 0.0) for r in rs) for k in rs[0]} for rs in runs)
    cats: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for i, ops in enumerate((ops_plain, ops_rep)):
        for (op, shapes), s in ops.items():
            cats[classify(op, shapes, cfg.adapter.rank)][i] += s
    total = [sum(v[i] for v in cats.values()) for i in (0, 1)]
    out += [
        "## Replica forward against the plain forward, by operator (torch profiler, self time)",
        "",
        "| operators | plain forward s | replica forward s | extra / plain forward total |",
        "|---|---|---|---|",
    ]
    for name, (a, r) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        out.append(f"| {name} | {a:.3f} | {r:.3f} | {(r - a) / total[0]:+.3f} |")
    out.append(f"| total | {total[0]:.3f} | {total[1]:.3f} | {(total[1] - total[0]) / total[0]:+.3f} |")
    name = args.name or f"profile-q{q}-b{b}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
