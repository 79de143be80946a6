"""Before/after scores of short P-RGE runs on the embedded SmolLM2-135M, one per task kind:
multiple choice (configs/tasks/choice.yaml), generation (generation.yaml) and chat (chat.yaml).

    python benchmarks/bench_tasks.py [--only choice,generation,chat] [--steps N]

Writes runs/tasks/auto_categorization_chat.jsonl (BIG-bench auto_categorization as conversations),
runs `zotune train` for each config, one at a time on one thread, and writes
benchmarks/results/tasks.md with the commands and the zero-shot / trained test scores.
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
    p.add_argument("--timeout", type=int, default=1500)
    args = p.parse_args()
    write_chat_data(ROOT / "runs" / "tasks" / "auto_categorization_chat.jsonl")
    for kind in args.only.split(","):
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
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{kind}: exit {proc.returncode}")
        (ROOT / "runs" / "tasks" / kind / "wall_s.txt").write_text(f"{wall:.0f}\n")
        print(f"{kind}: {wall:.0f} s", flush=True)
        write_report()  # after every run, from every run folder that has a summary


def write_report() -> None:
    rows = []
    for kind in KINDS:
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
