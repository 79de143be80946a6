"""The recipe panel: zeroth-order against first-order on several tasks and two model families.

Every cell is `zotune train` in its own process (one torch thread; `--jobs` of them at a time):
- zo: configs/demo.yaml as is (P-RGE q=4 b=4, 240 steps = 7,680 sequence-forwards), plus --zo;
- fo: first-order AdamW (lr 1e-3, batch 16, 60 steps) on the same adapter: the same 960 examples.
Zero-shot accuracy (raw, and with a decision threshold chosen on dev) comes from each run's own
zero-shot evaluation. Every number is the dev-selected test accuracy, over split seeds
(`data.split_seed`), reported as mean and spread. Finished cells are reused, so the panel can be
filled over several invocations; `--tag` keeps the runs of a candidate recipe apart.

    .venv/bin/python benchmarks/bench_panel.py                       # the whole panel
    .venv/bin/python benchmarks/bench_panel.py --models gemma3-270m --tasks multiemo --seeds 0
    .venv/bin/python benchmarks/bench_panel.py --tag lr3e-3 --zo "--optim.lr 3e-3" --methods zo

Writes benchmarks/results/panel[-TAG].md (the table) and keeps the runs under
benchmarks/results/panel-runs/ (summaries only are read back).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "panel"

# Why these tasks: two-way BIG-bench classification with one-token label words on both
# tokenizers, 1,000+ unique examples (1000 train / 200 dev / 500 test), prompts that fit 64-80
# tokens, and a spread of difficulty: sentiment (the demo), commonsense explanation checking
# (winowhy), a synthetic entailment pattern (epistemic_reasoning), fact verification (fever), and
# yes/no questions that need world knowledge (strategyqa).
# Every task but the demo's drops the demo's label filter and character limit.
OTHER = ["--data.labels", "null", "--data.max_input_chars", "null"]
TASKS = {
    "multiemo": [],  # configs/demo.yaml
    "winowhy": [
        "--data.task",
        "bigbench:winowhy",
        *OTHER,
        "--data.template",
        "{input}\nIs the reason correct or incorrect?\nAnswer:",
    ],
    "epistemic": [
        "--data.task",
        "bigbench:epistemic_reasoning",
        *OTHER,
        "--data.label_words",
        "{entailment: ' yes', non-entailment: ' no'}",
        "--data.template",
        "{input}\nEntailed (yes or no)?",
        "--data.max_length",
        "80",
    ],
    "fever": ["--data.task", "bigbench:fact_checker/fever", *OTHER],
    "strategyqa": ["--data.task", "bigbench:strategyqa", *OTHER],
}
MODELS = ["smollm2-135m", "gemma3-270m"]
FO = [
    "--optim.estimator",
    "fo",
    "--optim.optimizer",
    "adamw",
    "--optim.lr",
    "1e-3",
    "--optim.momentum",
    "0",
    "--optim.batch_size",
    "16",
    "--optim.schedule",
    "constant",
    "--train.steps",
    "60",
    "--train.eval_every",
    "30",
]
METHODS = {"zo": [], "fo": FO}


def run_cell(model: str, task: str, method: str, seed: int, tag: str, zo_extra: list[str]) -> dict:
    name = f"{model}/{task}/{method}{'-' + tag if tag and method == 'zo' else ''}-s{seed}"
    out = RUNS / name
    summary = out / "summary.json"
    if not summary.is_file():
        extra = zo_extra if method == "zo" else []
        cmd = [
            sys.executable,
            "-m",
            "zotune.cli",
            "train",
            "--overwrite",
            "--config",
            str(ROOT / "configs/demo.yaml"),
            "--model.name",
            model,
            "--data.split_seed",
            str(seed),
            *TASKS[task],
            *METHODS[method],
            *extra,
            "--train.threads",
            "1",
            "--train.progress",
            "false",
            "--train.checkpoint_every",
            "100000",
            "--train.out_dir",
            str(out),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f"FAILED {name}: {proc.stderr.strip()[-800:]}", flush=True)
            return {"name": name, "failed": True}
        print(f"done {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    s = json.loads(summary.read_text())
    zs = s["zero_shot"]
    return {
        "name": name,
        "model": model,
        "task": task,
        "method": method,
        "seed": seed,
        "test": s["test"]["accuracy"],
        "dev": s["dev"]["accuracy"],
        "zs_raw": zs["test"]["accuracy"],
        "zs_cal": zs.get("test_calibrated", {}).get("accuracy", float("nan")),
        "wall_s": s["train_wall_s"],
        "peak_mb": s["peak_rss_mb"],
        "selected": s["selected_step"],
    }


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f} (n={len(values)})"


def table(cells: list[dict], tag: str, zo_extra: list[str]) -> str:
    ok = [c for c in cells if not c.get("failed")]
    lines = [
        f"# Recipe panel{' (' + tag + ')' if tag else ''}",
        "",
        "Command: `benchmarks/bench_panel.py " + " ".join(sys.argv[1:]) + "`. 2-core machine, "
        "one torch thread per run, two runs at a time. zo: configs/demo.yaml"
        + (f" with `{' '.join(zo_extra)}`" if zo_extra else "")
        + "; fo: AdamW lr 1e-3, "
        "batch 16, 60 steps (the same 960 examples). Test accuracy (500 examples) of the "
        "dev-selected state, mean ± standard deviation over split seeds.",
        "",
        "| model | task | zero-shot raw | zero-shot dev-threshold | zo | fo | fo - zo | zo - threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gaps = []
    for model, task in itertools.product(MODELS, TASKS):
        mine = [c for c in ok if c["model"] == model and c["task"] == task]
        if not mine:
            continue
        zo = [c["test"] for c in mine if c["method"] == "zo"]
        fo = [c["test"] for c in mine if c["method"] == "fo"]
        raw = [c["zs_raw"] for c in mine if c["method"] == "zo"] or [c["zs_raw"] for c in mine]
        cal = [c["zs_cal"] for c in mine if c["method"] == "zo"] or [c["zs_cal"] for c in mine]
        gap = statistics.mean(fo) - statistics.mean(zo) if zo and fo else None
        if gap is not None:
            gaps.append(gap)
        margin = statistics.mean(zo) - statistics.mean(cal) if zo and cal else None
        lines.append(
            f"| {model} | {task} | {_ms(raw)} | {_ms(cal)} | {_ms(zo)} | {_ms(fo)} | "
            f"{'-' if gap is None else f'{gap:+.3f}'} | "
            f"{'-' if margin is None else f'{margin:+.3f}'} |"
        )
    if gaps:
        lines += ["", f"Mean gap fo - zo over {len(gaps)} model-task pairs: {statistics.mean(gaps):+.3f}."]
    for method in METHODS:
        mine = [c for c in ok if c["method"] == method]
        if mine:
            lines.append(
                f"- {method}: training wall time per run median "
                f"{statistics.median(c['wall_s'] for c in mine):.0f} s, peak RSS median "
                f"{statistics.median(c['peak_mb'] for c in mine):.0f} MB "
                f"({len(mine)} runs)."
            )
    failed = [c["name"] for c in cells if c.get("failed")]
    if failed:
        lines.append(f"- failed: {', '.join(failed)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--tag", default="", help="name of a candidate recipe (its zo runs apart)")
    ap.add_argument("--zo", default="", help="extra overrides for the zo runs, one string")
    args = ap.parse_args()
    zo_extra = shlex.split(args.zo)
    jobs = list(
        itertools.product(
            args.models.split(","),
            args.tasks.split(","),
            args.methods.split(","),
            [int(s) for s in args.seeds.split(",")],
        )
    )
    with ThreadPoolExecutor(args.jobs) as pool:
        cells = list(pool.map(lambda j: run_cell(*j, args.tag, zo_extra), jobs))
    text = table(cells, args.tag, zo_extra)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"panel{'-' + args.tag if args.tag else ''}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
