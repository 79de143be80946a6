"""Exported programs of the multiple-choice and completion-token losses: `zotune export` of a
choice task on both engines (parity-checked against eager), the program's step and scores against
eager per step (choice axis padded to the program's C), device-train against eager training step
by step with its replay log, and a generation task on ONNX Runtime. Tiny models; each program is
exported once per module."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from zotune.adapters.theta import set_theta, theta_of
from zotune.data.task import Example
from zotune.data.tokenize import encode
from zotune.engines.eager import build_params
from zotune.engines.program import ProgramEngine, load_program
from zotune.errors import ZotuneError
from zotune.estimators.prge import PRGEStep
from zotune.loss import batch_tensors, make_loss
from zotune.models import load_model
from zotune.train.device import device_train, export
from zotune.train.run import replay, train

pytestmark = pytest.mark.filterwarnings("ignore")

T, L, TOL = 16, 4, 1e-5
SUFFIX = {"executorch": "pte", "onnx": "onnx"}
COLOURS = [" red", " deep blue", " pale yellow"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def mc_jsonl(tmp_path_factory):
    """Multi-token choices, two or three per example."""
    rows = [
        {"prompt": f"Item {i} has the colour", "choices": COLOURS[: 2 + i % 2], "answer": i % 2}
        for i in range(60)
    ]
    return write_jsonl(tmp_path_factory.mktemp("mc") / "mc.jsonl", rows)


def mc_config(tiny_folder, data, out, **over):
    return tiny_config(tiny_folder, data, out, **{"data.max_target_length": L, **over})


@pytest.fixture(scope="module", params=["executorch", "onnx"])
def mc_program(request, tmp_path_factory, tiny_folder, mc_jsonl):
    engine = request.param
    folder = tmp_path_factory.mktemp(f"mc-{engine}")
    path = folder / f"mc.{SUFFIX[engine]}"
    report = export(mc_config(tiny_folder, mc_jsonl, folder / "unused"), str(path), engine=engine)
    return SimpleNamespace(engine=engine, path=str(path), report=report)


def test_choice_export_is_parity_checked(mc_program):
    check, meta = mc_program.report["check"], mc_program.report["meta"]
    assert {"forward", "loss", "loss_diff", "theta", "update"} <= set(check)
    assert all(v <= TOL for v in check.values()), check
    assert (meta["loss"], meta["n_choices"], meta["n_target"], meta["seq_len"]) == ("choice", 3, L, T)


def test_choice_program_step_and_scores_match_eager(mc_program, tiny_folder, mc_jsonl, tmp_path):
    """Re-synced per step: the program's loss, g and theta against eager PRGEStep, on batches of
    two-choice examples that the program pads to its three choices; then its scores."""
    cfg = mc_config(tiny_folder, mc_jsonl, tmp_path)
    model, tokenizer, _ = load_model(tiny_folder)
    adapter = build_params(model, cfg)
    loss = make_loss("choice")
    step = PRGEStep(model, adapter, loss, cfg.optim.q, cfg.optim.dual, cfg.optim.noise)
    program = load_program(mc_program.path)
    two = [Example(f"Thing {i} is", tuple(COLOURS[:2]), i % 2) for i in range(6)]
    for i in range(3):
        batch = batch_tensors(encode(two[2 * i : 2 * i + 2], tokenizer, T, L, "choice"), "choice")
        assert batch.input_ids.shape[1] == 2  # fewer choices than the program's C
        set_theta(adapter, program.get_lora_flat())
        loss_p, g_p = program.train_step(50 + i, 5e-2, 1e-2, batch)
        loss_e, g_e = step(torch.tensor([50 + i]), 5e-2, 1e-2, *batch)
        assert abs(loss_p - float(loss_e)) <= TOL
        assert float((g_p - g_e).abs().max()) * 2e-2 <= TOL  # the loss differences behind g
        assert float((program.get_lora_flat() - theta_of(adapter)).abs().max()) <= TOL
    assert program.get_lora_flat().abs().max() > 0
    rows = batch_tensors(encode(two[:5], tokenizer, T, L, "choice"), "choice")  # not a multiple of be
    set_theta(adapter, program.get_lora_flat())
    with torch.no_grad():
        want = loss.scores(model, *rows[:5])  # [5, 2]
    (got,) = ProgramEngine(program).scores(rows)  # [5, 3]: the padded choice scores -inf
    assert got.shape == (5, 3) and torch.isinf(got[:, 2]).all()
    assert float((got[:, :2] - want).abs().max()) <= TOL


def jsonl_lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def steps_agree(device, eager, tol_g):
    """Per step: the same seed and lr, the loss within TOL, g within tol_g; dev evaluations alike."""
    dev_log, eager_log = jsonl_lines(device / "replay.jsonl")[1:], jsonl_lines(eager / "replay.jsonl")[1:]
    assert len(dev_log) == len(eager_log) == 6
    for a, b in zip(dev_log, eager_log):
        assert (a["seed"], a["lr"]) == (b["seed"], b["lr"])
        assert max(abs(x - y) for x, y in zip(a["g"], b["g"])) <= tol_g, (a, b)
    train_d, train_e = (
        [r for r in jsonl_lines(p / "metrics.jsonl") if r["type"] == "train"] for p in (device, eager)
    )
    assert [r["done"] for r in train_d] == [r["done"] for r in train_e]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(train_d, train_e)) <= TOL
    evals_d, evals_e = (
        [r for r in jsonl_lines(p / "metrics.jsonl") if r["type"] == "eval"] for p in (device, eager)
    )
    assert len(evals_d) == len(evals_e) > 0
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(evals_d, evals_e)) <= 1e-4


def test_choice_device_train_matches_eager_per_step_and_replays(mc_program, tmp_path, tiny_folder, mc_jsonl):
    summary = device_train(mc_program.path, mc_config(tiny_folder, mc_jsonl, tmp_path / "device"))
    train(mc_config(tiny_folder, mc_jsonl, tmp_path / "eager"))
    steps_agree(tmp_path / "device", tmp_path / "eager", tol_g=1e-3)
    a = load_file(tmp_path / "device" / "checkpoint" / "state.safetensors")
    b = load_file(tmp_path / "eager" / "checkpoint" / "state.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    out = replay(str(tmp_path / "device" / "replay.jsonl"), str(tmp_path / "replayed"))
    rebuilt = load_file(out / "adapter_model.safetensors")
    for key, value in a.items():
        layer = key[len("param.") : -len(".lora_B")]
        torch.testing.assert_close(
            rebuilt[f"base_model.model.{layer}.lora_B.weight"], value, rtol=1e-4, atol=1e-6
        )
    assert 0 <= summary["test"]["accuracy"] <= 1


def test_program_of_another_task_is_refused(mc_program, tmp_path, tiny_folder, mc_jsonl, cls_jsonl):
    for cfg, field in (
        (mc_config(tiny_folder, mc_jsonl, tmp_path / "x", **{"data.max_target_length": 6}), "n_target"),
        (tiny_config(tiny_folder, cls_jsonl, tmp_path / "x"), "loss"),
    ):
        with pytest.raises(ZotuneError, match=field):
            device_train(mc_program.path, cfg)
        assert not (tmp_path / "x").exists()
    four = [
        {"prompt": f"Item {i} has the colour", "choices": [*COLOURS, " grey"], "answer": 0} for i in range(60)
    ]
    cfg = mc_config(tiny_folder, write_jsonl(tmp_path / "four.jsonl", four), tmp_path / "x")
    with pytest.raises(ZotuneError, match="at most 3 choices"):
        device_train(mc_program.path, cfg)
    assert not (tmp_path / "x").exists()


def test_generation_program_trains_like_eager(tmp_path, tiny_folder):
    """The completion-token loss through ONNX Runtime: export, then device-train step by step
    like eager training (the program computes the loss; decoding stays in eager)."""
    rows = [{"prompt": f"Q: what comes after {i}?\nA:", "completion": f" {i + 1}"} for i in range(60)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    over = {"data.max_length": 20, "data.max_target_length": L}
    report = export(
        tiny_config(tiny_folder, data, tmp_path / "u", **over), str(tmp_path / "qa.onnx"), engine="onnx"
    )
    assert report["meta"]["loss"] == "generation" and all(v <= TOL for v in report["check"].values())
    device_train(str(tmp_path / "qa.onnx"), tiny_config(tiny_folder, data, tmp_path / "device", **over))
    train(tiny_config(tiny_folder, data, tmp_path / "eager", **over))
    steps_agree(tmp_path / "device", tmp_path / "eager", tol_g=1e-3)
