"""Rebuild a trained adapter from a replay log alone: no model, no data, no forward pass.

The log's header holds the adapter layout; each step line holds (seed, g, lr). z is regenerated
from the seed and the update applied with the same code the trainer used, so on the same machine
and dtype the rebuilt tensors equal the trained ones bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from zotune.adapters.lora import init_lora_a
from zotune.adapters.theta import ThetaLayout
from zotune.checks import all_finite
from zotune.data.jsonl import get_field
from zotune.errors import DataError, ZotuneError, reading
from zotune.estimators.zo import momentum_buffers, update_from_seed
from zotune.io import json_lines

LOG = "a zotune replay log (a JSON header line, then one JSON object per step)"
HEADER_FIELDS = (("model", str), ("estimator", str), ("adapter_kind", str), ("momentum", (int, float)))
NOISE = ("normal", "rademacher")


def read_replay_log(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, step records), every field the replay uses checked; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise ZotuneError(f"replay log {path} does not exist")
    header, steps = None, []
    with reading(path, LOG) as at:
        for n, rec in json_lines(path, at):
            if not isinstance(rec, dict):
                raise DataError(f"expected a JSON object, got {type(rec).__name__}", file=str(path), line=n)
            if rec.get("type") == "header":
                header = rec
                for key, types in HEADER_FIELDS:
                    get_field(rec, key, types, path, n)
                if rec.get("noise") not in NOISE:
                    raise DataError(f"expected one of {list(NOISE)}", file=str(path), line=n, field="noise")
            elif rec.get("type") == "step":
                get_field(rec, "step", int, path, n)
                check_step_line(rec, f"{path}: line {n}", (header or {}).get("q"))
                steps.append(rec)
    if header is None:
        raise ZotuneError(f"{path}: no header line (a replay log starts with the adapter layout)")
    header_layout(header, path)  # a clear error for a layout this zotune does not read
    if header.get("estimator") == "fo":
        raise ZotuneError(f"{path}: a first-order run has no (seed, g) log to replay")
    expected = list(range(len(steps)))
    if [s["step"] for s in steps] != expected:
        raise ZotuneError(f"{path}: step lines are not consecutive from 0")
    return header, steps


def check_step_line(rec: dict, where: str, q=None) -> None:
    """A step line's seed (an integer), lr (a finite number) and g (q finite numbers, q from the
    header): a NaN or inf would spread through every later step of the rebuilt adapter."""
    for key in ("seed", "g", "lr"):
        if key not in rec:
            raise ZotuneError(f"{where}: missing field '{key}'")
    if not isinstance(rec["seed"], int) or isinstance(rec["seed"], bool):
        raise ZotuneError(f"{where}: field 'seed': expected an integer, got {rec['seed']!r}")
    if not all_finite(rec["lr"]):
        raise ZotuneError(f"{where}: field 'lr': expected a finite number, got {rec['lr']!r}")
    if not isinstance(rec["g"], list) or not rec["g"] or not all_finite(rec["g"]):
        raise ZotuneError(f"{where}: field 'g': expected a list of finite numbers, got {rec['g']!r}")
    if isinstance(q, int) and len(rec["g"]) != q:
        raise ZotuneError(f"{where}: field 'g': expected q={q} numbers (the header's q), got {len(rec['g'])}")


def header_layout(header: dict, path: str | Path = "replay log") -> ThetaLayout:
    return ThetaLayout.from_json(header.get("layout"), f"{path}: header field 'layout'")


def replay_lora(header: dict, steps: list[dict], where: str = "replay header") -> dict[str, torch.Tensor]:
    """-> adapter state ('<layer>.lora_A' / '.lora_B') after every logged step; errors start with
    `where`."""
    layout = header_layout(header)
    a = layout.adapter
    dtype = getattr(torch, layout.dtype)
    generator = torch.Generator().manual_seed(a["init_seed"])
    state = {}
    for name, d_in, d_out in a["layers"]:  # same order, same draws as LoRAAdapter
        state[f"{name}.lora_A"] = init_lora_a(a["rank"], d_in, generator, dtype)
        state[f"{name}.lora_B"] = torch.zeros(d_out, a["rank"], dtype=dtype)
    wrong = [e.name for e in layout if e.name not in state or state[e.name].shape != e.shape]
    if wrong:
        raise ZotuneError(
            f"{where}: layout tensor '{wrong[0]}' is not a LoRA tensor of its layers (name or shape)"
        )
    tensors = [state[e.name] for e in layout]
    replay_steps(layout, tensors, header, steps, torch.promote_types(dtype, torch.float32))
    return state


def replay_steps(
    layout: ThetaLayout,
    tensors: list[torch.Tensor],
    header: dict,
    steps: list[dict],
    g_dtype: torch.dtype = torch.float32,
) -> None:
    """g was computed in the loss dtype: fp32, or fp64 for fp64 models."""
    momentum = header.get("momentum", 0.0)
    buffers = momentum_buffers(tensors, momentum)
    for rec in steps:
        seed = torch.tensor([rec["seed"]], dtype=torch.int64)
        g = torch.tensor(rec["g"], dtype=g_dtype)
        update_from_seed(layout, tensors, seed, g, rec["lr"], header["noise"], momentum, buffers)
