"""Before/after scores of short P-RGE runs on the embedded SmolLM2-135M, one per task kind:
multiple choice (configs/tasks/choice.yaml), generation (generation.yaml) and chat (chat.yaml).

    python benchmarks/bench_tasks.py [--only choice,generation,chat] [--steps N]

Runs `zotune train` for each config, one at a time on one thread (--steps overrides
train.steps), and writes benchmarks/results/tasks.md (generation and chat: the zero-shot /
trained test scores of decoded text) and benchmarks/results/tasks-choice.md (multiple choice:
zero-shot and trained dev / test accuracy, the dev curve). The chat run first writes
runs/tasks/auto_categorization_chat.jsonl (BIG-bench auto_categorization as conversations).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("choice", "generation", "chat")
SYSTEM = "Answer with the category only, in a few words."


def write_chat_data(path: Path) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from zotune.data.bigbench import archive_index, bigbench_archive, read_task

    archive = bigbench_archive()
    task = read_task(archive, archive_index(archive), "auto_categorization")
    rows = []
    for ex in task["examples"]:
        target = ex["target"][0] if isinstance(ex["target"], list) else ex["target"]
        if len(ex["input"]) <= 200:
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"{ex['input']} what?"},
                        {"role": "assistant", "content": target.strip()},
                    ]
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="generation,chat,choice")
    p.add_argument("--steps", type=int, default=None, help="train.steps of every run")
    p.add_argument("--timeout", type=int, default=3000)
    args = p.parse_args()
    kinds = args.only.split(",")
    if not set(kinds) <= set(KINDS):
        raise SystemExit(f"--only: expected some of {','.join(KINDS)}, got {args.only}")
    if "chat" in kinds:
        write_chat_data(ROOT / "runs" / "tasks" / "auto_categorization_chat.jsonl")
    for kind in kinds:
        cmd = [
            sys.executable,
            "-m",
            "zotune.cli",
            "train",
            "--overwrite",
            "--config",
            f"configs/tasks/{kind}.yaml",
            "--train.progress",
            "false",
        ]
        if args.steps:
            cmd += ["--train.steps", str(args.steps)]
        t0, cpu0 = time.perf_counter(), _children_cpu()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{kind}: exit {proc.returncode}")
        (ROOT / "runs" / "tasks" / kind / "wall_s.txt").write_text(f"{wall:.0f}\n")
        (ROOT / "runs" / "tasks" / kind / "cpu_s.txt").write_text(f"{cpu:.0f}\n")
        print(f"{kind}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        if kind == "choice":
            write_choice_report(" ".join(["python benchmarks/bench_tasks.py", *sys.argv[1:]]))
        else:
            write_report()  # after every run, from every run folder that has a summary


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def write_choice_report(command: str) -> None:
    """results/tasks-choice.md: zero-shot and trained accuracy on dev and test, the dev curve."""
    run = ROOT / "runs" / "tasks" / "choice"
    s = json.loads((run / "summary.json").read_text())
    c, zs = s["config"], s["zero_shot"]
    d, o = c["data"], c["optim"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in records if r["type"] == "eval" and r["split"] == "dev"]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    lrs = sorted(r["lr"] for r in records if r["type"] == "train")
    cpu = float((run / "cpu_s.txt").read_text())
    wall = float((run / "wall_s.txt").read_text())
    out = [
        "# Multiple choice on SmolLM2-135M: before/after a short P-RGE run",
        "",
        f"`OMP_NUM_THREADS=1 nice -n 10 {command}` (`zotune train --config configs/tasks/choice.yaml`,",
        f"one torch thread). `{d['task']}`, template {d['template']!r}, train/dev/test "
        f"{d['train_size']}/{d['dev_size']}/{d['test_size']}; each choice scored by the summed",
        "log-probability of its tokens, loss = cross-entropy over the choices. LoRA-FA r=16 on all",
        f"210 projections; P-RGE dual q={o['q']} b={o['batch_size']}, eps {o['eps']}, lr {o['lr']} "
        f"(normalize {o['normalize']}), momentum {o['momentum']}, {o['schedule']} schedule, "
        f"{s['steps']} steps; adapter selected on dev (step {s['selected_step']}), test evaluated "
        "once on it.",
        "",
        "| | dev accuracy | test accuracy | dev loss | test loss |",
        "|---|---|---|---|---|",
        f"| zero-shot | {zs['dev']['accuracy']:.3f} | {zs['test']['accuracy']:.3f} | "
        f"{zs['dev']['loss']:.3f} | {zs['test']['loss']:.3f} |",
        f"| trained (selected at step {s['selected_step']}) | {s['dev']['accuracy']:.3f} | "
        f"{s['test']['accuracy']:.3f} | {s['dev']['loss']:.3f} | {s['test']['loss']:.3f} |",
        "",
        "Dev by step: "
        + ", ".join(f"{r['done']}: {r['accuracy']:.3f} (loss {r['loss']:.3f})" for r in curve),
        "",
        f"Training loss: first step {losses[0]:.3f}, mean of the last 10 steps "
        f"{sum(losses[-10:]) / len(losses[-10:]):.3f}; the lr the steps applied (after the step "
        f"scale): median {lrs[len(lrs) // 2]:.2g}, max {lrs[-1]:.2g}. "
        f"Training loop {s['train_wall_s']:.0f} s wall "
        f"(evaluations included); whole run {wall:.0f} s wall, {cpu / 60:.1f} CPU-minutes; "
        f"peak RSS {s['peak_rss_mb']:.0f} MB.",
    ]
    path = ROOT / "benchmarks" / "results" / "tasks-choice.md"
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")


def write_report() -> None:
    rows = []
    for kind in ("generation", "chat"):
        run = ROOT / "runs" / "tasks" / kind
        if (run / "summary.json").is_file() and (run / "wall_s.txt").is_file():
            rows.append(
                (
                    kind,
                    json.loads((run / "summary.json").read_text()),
                    float((run / "wall_s.txt").read_text()),
                )
            )
    _report(rows)


def fmt(d: dict, keys) -> str:
    return ", ".join(f"{k} {d[k]:.3f}" for k in keys if k in d)


def _report(rows) -> None:
    out = [
        "# Task kinds on SmolLM2-135M: before/after a short P-RGE run",
        "",
        "`python benchmarks/bench_tasks.py` (each run: `zotune train --config configs/tasks/<kind>.yaml`,",
        "one thread, one run at a time). Test scores of the zero-shot model and of the adapter selected",
        "on dev; LoRA-FA r=16 on all 210 projections, P-RGE dual, ZO-SGD with momentum 0.9.",
        "",
        "| kind | task | train/dev/test | steps (q, b) | zero-shot test "
        "| trained test (selected at step) | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, s, wall in rows:
        c = s["config"]
        keys = ("accuracy",) if "accuracy" in s["test"] else ("exact_match", "f1", "rougeL")
        d = c["data"]
        out.append(
            f"| {kind} | `{d['task']}` | {d['train_size']}/{d['dev_size']}/{d['test_size']} | "
            f"{s['steps']} ({c['optim']['q']}, {c['optim']['batch_size']}) | "
            f"{fmt(s['zero_shot']['test'], keys)} | {fmt(s['test'], keys)} ({s['selected_step']}) | "
            f"{wall:.0f} s |"
        )
    out += ["", "Sample predictions (test, trained adapter):", ""]
    for kind, s, _ in rows:
        for x in s["test"].get("samples", [])[:2]:
            out.append(f"- {kind}: reference {x['reference']!r}, prediction {x['prediction']!r}")
    path = ROOT / "benchmarks" / "results" / "tasks.md"
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
