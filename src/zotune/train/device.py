"""`zotune export` and `zotune device-train`: the training step as an exported program (ExecuTorch
.pte or ONNX), and the one driver that trains with that engine's runtime alone executing it.

The host only tokenises, batches, chooses seeds and the schedule, evaluates through the program's
`forward` method and writes files: it never loads the model weights. Beside the program the exporter
writes `<out>.frozen.safetensors` with what an adapter file needs and the program does not hold
(LoRA-FA's frozen A matrices) and, in its metadata, the replay-log header, so the device's replay
log rebuilds the adapter in eager PyTorch (`zotune replay`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from zotune.adapters.peft_io import save_peft_described
from zotune.config import Config
from zotune.data.jsonl import get_field
from zotune.engines.eager import build_params
from zotune.engines.export_common import ProgramFormatError, StepSpec
from zotune.engines.signature import program_kind
from zotune.errors import ZotuneError, reading
from zotune.io import atomic_write_bytes, atomic_write_text
from zotune.loss import make_loss
from zotune.models import load_tokenizer
from zotune.replay import header_layout
from zotune.train.loop import Trainer
from zotune.train.run import encode_splits, prepare, replay_header
from zotune.train.rundir import check_run_dir


def frozen_path(pte: str | Path) -> Path:
    return Path(str(pte) + ".frozen.safetensors")


ENGINES = ("executorch", "onnx")
FROZEN = "a frozen-tensor file written by zotune export beside the program (re-export the program)"


def _frozen_digest(tensors: dict[str, torch.Tensor], header: str) -> str:
    h = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_frozen(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(frozen tensors, replay header) of a program's `.frozen.safetensors`, checked against the
    sha256 written with them."""
    with reading(path, FROZEN, error=ProgramFormatError) as at:
        frozen = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        at.key = "replay_header"
        text = metadata["replay_header"]
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ProgramFormatError(f"expected a JSON object, got {type(header).__name__}", file=str(path))
        get_field(header, "model", str, path, error=ProgramFormatError)
        at.key = None
        digest = metadata.get("sha256")  # programs exported by older versions carry none
        if digest is not None and digest != _frozen_digest(frozen, text):
            raise ProgramFormatError(
                "tensors do not match the sha256 written with them (corrupted)", file=path
            )
    return frozen, header


def export(
    cfg: Config,
    out: str,
    engine: str = "executorch",
    quantize: str | None = None,
    block_size: int | None = None,
    int4_layers: str | None = None,
    dynamic_length: bool | None = None,
) -> dict:
    if engine not in ENGINES:
        raise ZotuneError(f"--engine: expected one of {list(ENGINES)}, got '{engine}'")
    if engine == "onnx":
        from zotune.engines.onnx import export_program

        options = {"block_size": block_size or 32, "int4_layers": int4_layers, "threads": cfg.train.threads}
    else:
        from zotune.engines.executorch import export_program

        if int4_layers is not None:
            raise ZotuneError("--int4-layers: the ExecuTorch engine quantizes every base linear (8da4w)")
        options = {"group_size": block_size or 32}
    # A symbolic sequence length unless asked otherwise; ExecuTorch's XNNPACK lowering of one is slow.
    options["dynamic_length"] = (engine == "onnx") if dynamic_length is None else dynamic_length
    if cfg.optim.estimator != "prge" or cfg.adapter.kind == "full":
        raise ZotuneError(
            "export: the exported step is P-RGE on a LoRA / LoRA-FA adapter "
            "(optim.estimator prge, adapter.kind lora-fa or lora)"
        )
    model, _, splits = prepare(cfg)
    kind = program_kind(splits.kind)
    adapter = build_params(model, cfg)
    header = replay_header(cfg, adapter)
    frozen = {k: v for k, v in adapter.state().items() if k.endswith("lora_A")}
    report = export_program(
        model,
        adapter,
        make_loss(kind),
        StepSpec(
            cfg.optim.q,
            cfg.optim.batch_size,
            cfg.data.max_length,
            n_choices(splits),
            dual=cfg.optim.dual,
            noise=cfg.optim.noise,
            quantize=quantize,
            eval_batch=cfg.train.eval_batch_size,
            n_target=0 if kind == "classification" else cfg.data.max_target_length,
            model_name=cfg.model.name,
            momentum=cfg.optim.momentum,
        ),
        out,
        log=lambda msg: print(msg, flush=True),
        **options,
    )
    text = json.dumps(header)
    metadata = {"replay_header": text, "sha256": _frozen_digest(frozen, text)}
    atomic_write_bytes(frozen_path(out), save(frozen, metadata=metadata))
    return report.as_dict()


def n_choices(splits) -> int:
    """C of the task's program: the label words, or the most choices of any example of any split
    (splits with fewer are padded to it); 0 for generation and chat."""
    if splits.kind == "classification":
        return int(splits.train.choice_ids.shape[1])
    if splits.kind == "choice":
        return max(int(s.input_ids.shape[1]) for s in (splits.train, splits.dev, splits.test))
    return 0


def check_adapter(pte, layout, cfg: Config) -> None:
    """The adapter the program was exported with (its layout's description) against the
    config's: kind, rank, alpha, targets."""
    a, have = cfg.adapter, layout.adapter
    want = {"kind": a.kind, "rank": a.rank, "alpha": a.alpha, "targets": list(a.targets)}
    wrong = [
        f"adapter.{k}: program has {have.get(k)!r}, config has {v!r}"
        for k, v in want.items()
        if have.get(k) != v
    ]
    if wrong:
        raise ZotuneError(f"{pte}: exported for another adapter (" + "; ".join(wrong) + "); re-export it")


def device_train(
    pte: str, cfg: Config, resume: bool = False, stop_after: int | None = None, overwrite: bool = False
) -> dict | None:
    from zotune.engines.export_common import program_layout, read_engine, read_sidecar
    from zotune.engines.program import ProgramEngine, runtime

    check_run_dir(cfg, resume, overwrite)
    engine_name = read_engine(pte)  # the runtime is the one the program's metadata names
    meta = read_sidecar(pte, engine_name)
    if not frozen_path(pte).is_file():
        raise ZotuneError(
            f"{frozen_path(pte)} is missing: it is written by `zotune export` beside the program"
        )
    frozen, header = read_frozen(frozen_path(pte))
    o = cfg.optim
    if o.estimator != "prge":
        raise ZotuneError(
            f"device-train runs the program's P-RGE step: optim.estimator must be prge, got '{o.estimator}'"
        )
    # theta starts from the exported values: B = 0, and LoRA's trained A from its seeded init.
    program_cls, set_threads = runtime(engine_name)
    if cfg.train.threads:
        set_threads(cfg.train.threads)
    layout = program_layout(pte, meta)
    check_adapter(pte, layout, cfg)
    start = {e.name: frozen.get(e.name, torch.zeros(e.shape)) for e in layout}
    splits = encode_splits(cfg, load_tokenizer(cfg.model.name))
    kind = program_kind(splits.kind)
    program = program_cls.load(
        pte,
        lora=start,
        q=o.q,
        b=o.batch_size,
        seq_len=cfg.data.max_length,
        noise=o.noise,
        dual=o.dual,
        momentum=float(o.momentum),
        model=cfg.model.name,
        loss=kind,
        n_target=None if kind == "classification" else cfg.data.max_target_length,
    )
    if kind == "choice" and n_choices(splits) > program.n_choices:
        raise ZotuneError(
            f"{pte}: exported for at most {program.n_choices} choices per example, this task "
            f"has examples with {n_choices(splits)}; re-export it"
        )
    described = header_layout(header, frozen_path(pte)).adapter

    def save(state, folder):
        extra = {"engine": engine_name, "program": str(pte)}
        save_peft_described(folder, state, described, header["model"], extra)

    header = {**header, "engine": engine_name, "program": str(pte)}
    engine = ProgramEngine(program, frozen)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "program.json", json.dumps(program.meta, indent=1))
    return Trainer(cfg, engine, splits, out, save, header).run(resume, stop_after)
