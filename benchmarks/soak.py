"""kill -9 soak: runs killed with SIGKILL at random moments, resumed with --resume until done, end
with the same bits as an uninterrupted run.

For each of `zotune train` (eager), `zotune device-train` of the ExecuTorch program and of the ONNX
program: one uninterrupted reference run, then N runs each killed at a seeded random moment in
[0, reference wall time) and resumed (`--resume` once a checkpoint is committed, a fresh start
before) until the command exits 0. Each finished run is compared with the reference, bit for bit:
the adapter folder's files, the replay log, and the metrics log without its timing fields. The
run folder must also hold no temporary file of the atomic writer (`.<name>.<pid>.<random>.tmp`)
after the resume: those a kill leaves are removed when the run restarts.

    .venv/bin/python benchmarks/soak.py                       # tiny model, N=20 per command
    .venv/bin/python benchmarks/soak.py --model smollm2-135m --kills 5

Writes benchmarks/results/soak.md and soak.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = {
    "positive": ["good", "great", "fine", "lovely", "superb"],
    "negative": ["bad", "awful", "poor", "nasty", "dreadful"],
}


def sentiment_jsonl(path: Path, n: int = 80) -> Path:
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        rows.append({"input": f"item {i} was {WORDS[label][i % 5]}", "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(work: Path, model: str, data: Path, steps: int) -> Path:
    from zotune.config import Config

    cfg = Config()
    cfg.model.name = model
    cfg.data.task = f"jsonl:{data}"
    cfg.data.train_size, cfg.data.dev_size, cfg.data.test_size = 40, 16, 16
    cfg.data.max_length = 16
    cfg.adapter.rank, cfg.adapter.alpha = 4, 8
    cfg.optim.q, cfg.optim.batch_size, cfg.optim.lr = 2, 2, 1e-2
    cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = steps, 50, 10
    cfg.train.eval_batch_size = 8
    cfg.train.progress = False
    cfg.train.threads = 1
    cfg.train.out_dir = str(work / "unused")
    path = work / "soak.yaml"
    path.write_text(cfg.to_yaml())
    return path


def zotune(*argv: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "zotune.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        **kw,
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{proc.args} exited {proc.returncode}:\n{err.decode()[-2000:]}")


def temp_files(run: Path) -> list[str]:
    from zotune.io import _TEMP

    return sorted(p.name for p in run.rglob("*") if _TEMP.match(p.name)) if run.exists() else []


def committed(run: Path) -> bool:
    return any((run / name / "meta.json").is_file() for name in ("checkpoint", "checkpoint.old"))


def fingerprint(run: Path) -> dict:
    """What must be bitwise equal: adapter files, the replay log, metrics without timing fields."""
    from zotune.train.logs import TIMING_FIELDS

    metrics = [
        {k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    adapter = {p.name: p.read_bytes() for p in sorted((run / "adapter").iterdir())}
    return {"adapter": adapter, "replay": (run / "replay.jsonl").read_bytes(), "metrics": metrics}


def soak(name: str, argv: list[str], work: Path, kills: int, rng: random.Random) -> dict:
    ref = work / f"{name}-ref"
    t0 = time.perf_counter()
    finish(zotune(*argv, "--train.out_dir", str(ref)))
    wall = time.perf_counter() - t0
    want = fingerprint(ref)
    result = {"command": name, "reference_s": round(wall, 1), "runs": kills, "killed": 0}
    result.update(
        {
            "after_checkpoint": 0,
            "orphans_left": 0,
            "resumes": 0,
            "equal": 0,
            "unequal": [],
            "kill_points_s": [],
        }
    )
    for i in range(kills):
        run = work / f"{name}-{i}"
        delay = rng.uniform(0.0, wall)
        result["kill_points_s"].append(round(delay, 2))
        proc = zotune(*argv, "--train.out_dir", str(run))
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            result["killed"] += 1
            result["after_checkpoint"] += committed(run)
        proc.stderr.close()
        result["orphans_left"] += bool(temp_files(run))
        while proc.returncode != 0:  # resume until the command completes
            proc = zotune(*argv, "--train.out_dir", str(run), *(["--resume"] if committed(run) else []))
            finish(proc)
            result["resumes"] += 1
        left = temp_files(run)
        if fingerprint(run) == want and not left:
            result["equal"] += 1
        else:
            result["unequal"].append({"run": i, "kill_s": delay, "temporary_files": left})
        print(f"{name} {i + 1}/{kills}: kill at {delay:.2f} s, equal {result['equal']}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (a random 2-layer Llama) or any model name")
    p.add_argument("--kills", type=int, default=20, help="killed runs per command")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commands", default="train,executorch,onnx")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        model = args.model
        if model == "tiny":
            from zotune.models.loader import load_tokenizer
            from zotune.models.tiny import save_tiny_model

            model = str(save_tiny_model("llama", load_tokenizer("smollm2-135m"), work / "tiny"))
        config = write_config(work, model, sentiment_jsonl(work / "data.jsonl"), args.steps)
        commands = {"train": ["train", "--config", str(config)]}
        for engine, suffix in (("executorch", ".pte"), ("onnx", ".onnx")):
            program = work / f"step{suffix}"
            if engine in args.commands.split(","):
                finish(zotune("export", "--engine", engine, "--config", str(config), "--out", str(program)))
                commands[engine] = ["device-train", str(program), "--config", str(config)]
        results = [
            soak(name, commands[name], work, args.kills, rng)
            for name in args.commands.split(",")
            if name in commands
        ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "steps": args.steps, "kills": args.kills, "seed": args.seed}
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=1))
    lines = [
        f"kill -9 soak: {args.model}, {args.steps} steps, seed {args.seed} "
        f"(`benchmarks/soak.py --model {args.model} --kills {args.kills}`)",
        "",
        "| command | reference run | runs | killed mid-run | of them after a checkpoint | "
        "left temporary files / removed on restart | resumes | bitwise equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        kept = sum(bool(u["temporary_files"]) for u in r["unequal"])
        lines.append(
            f"| {r['command']} | {r['reference_s']} s | {r['runs']} | {r['killed']} | "
            f"{r['after_checkpoint']} | {r['orphans_left']} / {r['orphans_left'] - kept} | "
            f"{r['resumes']} | {r['equal']}/{r['runs']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(r["unequal"] for r in results):
        raise SystemExit(f"runs differ from the reference: {[r['unequal'] for r in results]}")


if __name__ == "__main__":
    main()
