"""The `zotune` command.

    zotune models [NAME]                    list embedded models, or describe one
    zotune data [--config x.yaml] [--k v]   load a task and show its splits
    zotune fetch                            prepare the embedded model and data offline caches
    zotune train --config x.yaml [--section.key value ...] [--resume]
    torchrun --nproc_per_node N -m zotune.cli train --config x.yaml --train.parallel data|query
    zotune eval --config x.yaml [--adapter DIR] [--split test] [--harness TASKS [--harness-include DIR]]
    zotune export --engine executorch --config x.yaml --out model.pte [--quantize 8da4w]
    zotune export --engine onnx --config x.yaml --out step.onnx [--quantize int4]
    zotune device-train model.pte|step.onnx --config x.yaml [--resume]
    zotune replay RUN/replay.jsonl --out DIR
    zotune export-adapter ADAPTER_DIR --format gguf|merged --out PATH [--base MODEL]
    zotune federate --config configs/federated.yaml [--resume]   Flower simulation, K clients

Errors in the user's input print one line naming the file/line/field and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from zotune.errors import ZotuneError, reading
from zotune.runtime import keep_heap


def read_config(path: str | None, overrides: list[str]):
    """The config the commands use: a file that cannot be decoded or parsed is one error."""
    from zotune.config import load_config

    if path is None:
        return load_config(None, overrides)
    with reading(path, "a UTF-8 YAML file of config sections"):
        return load_config(path, overrides)


def _config(args, rest):
    from zotune.config import check_field

    cfg = read_config(args.config, rest)
    if getattr(args, "stop_after", None) is not None:  # checked like a config field
        check_field("--stop-after", args.stop_after, {"check": "positive"})
    return cfg


def cmd_models(args, rest):
    from zotune.models import EMBEDDED, load_model

    if not args.name:
        for name, (_, _, desc) in EMBEDDED.items():
            print(f"{name:16s} {desc}")
        return
    model, tokenizer, source = load_model(args.name)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "name": args.name,
                "source": source.kind,
                "path": source.path,
                "architecture": type(model).__name__,
                "parameters": n_params,
                "layers": model.config.num_hidden_layers,
                "hidden_size": model.config.hidden_size,
                "vocab": len(tokenizer),
            },
            indent=1,
        )
    )


def cmd_data(args, rest):
    from zotune.data import load_task

    cfg = _config(args, rest)
    task = load_task(cfg.data)
    print(json.dumps({"task": task.name, "kind": task.kind, **task.sizes()}, indent=1))
    for ex in task.train[: args.show]:
        print("---")
        print(
            ex.prompt
            + (
                f"  -> {ex.choices[ex.label]!r} of {list(ex.choices)}"
                if ex.label is not None
                else f"  -> {ex.target!r}"
            )
        )


def cmd_fetch(args, rest):
    from zotune.data.bigbench import bigbench_archive
    from zotune.models import resolve

    print("model:", resolve("smollm2-135m").path)
    print("bigbench:", bigbench_archive(verify=True))


def cmd_train(args, rest):
    cfg = _config(args, rest)  # first: a bad config is refused before torch is imported
    from zotune.train.distributed import is_main
    from zotune.train.run import train

    summary = train(cfg, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)
    if not is_main():  # under torchrun, rank 0 alone reports
        return
    if summary is None:
        print(f"stopped after {args.stop_after} steps; continue with --resume")
        return
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    zs = s["zero_shot"]
    metric = next(m for m in ("accuracy", "score", "loss") if m in s["test"])
    print(f"zero-shot test {metric}: {zs['test'][metric]:.4f}")
    if "test_calibrated" in zs:
        print(f"zero-shot test accuracy with a dev-chosen threshold: {zs['test_calibrated']['accuracy']:.4f}")
    print(
        f"after {s['steps']} steps (selected on dev at step {s['selected_step']}): "
        f"dev {metric} {s['dev'][metric]:.4f}, test {metric} {s['test'][metric]:.4f}"
    )
    print(f"train time {s['train_wall_s']:.0f} s, peak RSS {s['peak_rss_mb']:.0f} MB")
    print(f"adapter: {s['adapter']}\nplot: {s['plot']}")


def cmd_export(args, rest):
    from zotune.train.device import export

    cfg = _config(args, rest)
    quantize = None if args.quantize == "none" else args.quantize
    allowed = {"executorch": (None, "8da4w"), "onnx": (None, "int4", "int4-zp", "int4-hqq")}[args.engine]
    if quantize not in allowed:
        raise ZotuneError(
            f"--quantize {quantize}: the {args.engine} engine offers {[q or 'none' for q in allowed]}"
        )
    dynamic = None if args.length is None else args.length == "dynamic"
    report = export(cfg, args.out, args.engine, quantize, args.block_size, args.int4_layers, dynamic)
    print(json.dumps(report, indent=1))


def cmd_device_train(args, rest):
    cfg = _config(args, rest)
    from zotune.train.device import device_train

    summary = device_train(
        args.program, cfg, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite
    )
    if summary is None:
        print(f"stopped after {args.stop_after} steps; continue with --resume")
        return
    _print_summary(summary)


def cmd_eval(args, rest):
    cfg = _config(args, rest)
    from zotune.train.run import evaluate_adapter

    if args.harness:  # lm-evaluation-harness tasks instead of the config's task
        from zotune.harness import run_harness

        print(
            json.dumps(
                run_harness(cfg, args.adapter, args.harness, args.harness_include, args.limit), indent=1
            )
        )
        return
    print(json.dumps(evaluate_adapter(cfg, args.adapter, args.split), indent=1))


def cmd_replay(args, rest):
    from zotune.train.run import replay

    print(f"adapter rebuilt from {args.log}: {replay(args.log, args.out)}")


def cmd_export_adapter(args, rest):
    from zotune.adapters.gguf_io import export_gguf, export_merged

    fmt = "merged" if args.merge else args.format
    if fmt is None:
        raise ZotuneError("export-adapter: expected --format gguf, --format merged or --merge")
    out = (export_gguf if fmt == "gguf" else export_merged)(args.adapter, args.out, args.base)
    print(f"{fmt} adapter written: {out}")


def cmd_federate(args, rest):
    from zotune.federated.simulate import federate, traffic_table

    cfg = _config(args, rest)
    summary = federate(cfg, resume=args.resume, stop_after=args.stop_after)
    print(traffic_table(cfg.train.out_dir))
    if summary is None:
        print(f"stopped after {args.stop_after} rounds; continue with --resume")
        return
    zs, metric = summary["zero_shot"], "accuracy" if "accuracy" in summary["test"] else "loss"
    print(f"zero-shot test {metric}: {zs['test'][metric]:.4f}")
    if "test_calibrated" in zs:
        print(f"zero-shot test accuracy with a dev-chosen threshold: {zs['test_calibrated']['accuracy']:.4f}")
    print(
        f"after {summary['rounds']} rounds ({summary['mode']}): test {metric} "
        f"{summary['test'][metric]:.4f}; bytes per client per round: up "
        f"{summary['bytes_up_per_client_round']:.0f}, down "
        f"{summary['bytes_down_per_client_round']:.0f}"
    )
    print(f"adapter: {summary['adapter']}")


def _config_epilog() -> str:
    from zotune.config import fields_help

    return "config fields (set in the YAML file or as --section.key value):\n" + fields_help()


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes are errors like any other: one `zotune: error:` line, status 2."""

    def error(self, message):
        raise ZotuneError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zotune", description="Forward-only fine-tuning of LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("models", help="list embedded models or describe one")
    s.add_argument("name", nargs="?")
    s.set_defaults(fn=cmd_models)
    for name, fn, help_ in (
        ("data", cmd_data, "load a task and show its splits"),
        ("train", cmd_train, "fine-tune (eager PyTorch)"),
        ("eval", cmd_eval, "evaluate a model and adapter on a split"),
        ("export", cmd_export, "export the training step (ExecuTorch .pte or ONNX)"),
        ("device-train", cmd_device_train, "train with an engine's runtime executing an exported step"),
    ):
        s = sub.add_parser(
            name, help=help_, epilog=_config_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter
        )
        s.add_argument("--config", help="YAML config; further --section.key value override it")
        s.set_defaults(fn=fn)
    sub.choices["data"].add_argument("--show", type=int, default=2, help="examples to print")
    sub.choices["device-train"].add_argument("program", help="a .pte or .onnx written by zotune export")
    for name in ("train", "device-train"):
        sub.choices[name].add_argument(
            "--resume", action="store_true", help="continue from the run folder's checkpoint"
        )
        sub.choices[name].add_argument(
            "--stop-after", type=int, default=None, help="stop after this many steps (resume later)"
        )
        sub.choices[name].add_argument(
            "--overwrite", action="store_true", help="replace the run in a non-empty train.out_dir"
        )
    sub.choices["export"].add_argument("--out", required=True, help="the .pte / .onnx to write")
    sub.choices["export"].add_argument("--engine", default="executorch", choices=["executorch", "onnx"])
    sub.choices["export"].add_argument(
        "--quantize",
        default="none",
        choices=["none", "8da4w", "int4", "int4-zp", "int4-hqq"],
        help="8da4w: ExecuTorch; int4, int4-zp (with zero points), int4-hqq (HQQ-fitted blocks): "
        "ONNX (MatMulNBits)",
    )
    sub.choices["export"].add_argument(
        "--block-size", type=int, default=None, help="weights per 4-bit block / group (default 32)"
    )
    sub.choices["export"].add_argument(
        "--int4-layers",
        metavar="REGEX",
        default=None,
        help="int4 (ONNX): quantize only the base linears whose name matches, e.g. 'mlp'",
    )
    sub.choices["export"].add_argument(
        "--length",
        default=None,
        choices=["dynamic", "static"],
        help="dynamic: the program takes any sequence length up to data.max_length, and each batch "
        "runs without its padding columns; static: exactly data.max_length (default: dynamic for "
        "onnx, static for executorch, whose XNNPACK lowering of a symbolic length is slow)",
    )
    sub.choices["eval"].add_argument("--adapter", help="PEFT adapter folder")
    sub.choices["eval"].add_argument("--split", default="test", choices=["train", "dev", "test"])
    sub.choices["eval"].add_argument(
        "--harness", metavar="TASKS", help="run lm-evaluation-harness tasks (comma-separated) on the adapter"
    )
    sub.choices["eval"].add_argument(
        "--harness-include",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder of lm-eval task YAML files (repeatable)",
    )
    sub.choices["eval"].add_argument("--limit", type=int, default=None, help="--harness: examples per task")
    s = sub.add_parser(
        "federate",
        help="federated fine-tuning in Flower's simulation engine",
        epilog=_config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", help="YAML config; further --section.key value override it")
    s.add_argument("--resume", action="store_true", help="continue from the server's checkpoint")
    s.add_argument("--stop-after", type=int, default=None, help="stop after this many rounds")
    s.set_defaults(fn=cmd_federate)
    s = sub.add_parser("fetch", help="prepare the offline model and data caches")
    s.set_defaults(fn=cmd_fetch)
    s = sub.add_parser("replay", help="rebuild an adapter from a replay log")
    s.add_argument("log")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_replay)
    s = sub.add_parser(
        "export-adapter", help="write a PEFT adapter as a llama.cpp GGUF adapter or a merged model"
    )
    s.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    s.add_argument("--format", choices=["gguf", "merged"], default=None)
    s.add_argument("--merge", action="store_true", help="the same as --format merged")
    s.add_argument("--out", required=True, help="the .gguf file, or the merged model folder")
    s.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    s.set_defaults(fn=cmd_export_adapter)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args, rest = build_parser().parse_known_args(argv)
        keep_heap()
        if rest and args.command in ("models", "fetch", "replay", "export-adapter"):
            raise ZotuneError(f"{args.command}: unexpected arguments {rest}")
        args.fn(args, rest)
    except ZotuneError as e:
        print(f"zotune: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
