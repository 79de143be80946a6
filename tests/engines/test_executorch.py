"""The ExecuTorch engine: the exported P-RGE step against eager PyTorch, shared state across the
four methods, resume, and refusal of corrupted or mismatched programs. Tiny models only; each
program is exported once per module."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn

pytest.importorskip("executorch")

from zotune.adapters.lora import LoRAAdapter  # noqa: E402
from zotune.adapters.theta import LAYOUT_VERSION, set_theta, theta_of  # noqa: E402
from zotune.engines.executorch import (  # noqa: E402
    TOLERANCE,
    EngineError,
    ExportCheckError,
    ProgramFileError,
    PteProgram,
    export_program,
)
from zotune.engines.export_common import StepSpec, sidecar_path  # noqa: E402
from zotune.estimators.prge import PRGEStep  # noqa: E402
from zotune.loss import ClassificationLoss, trim_left_padding  # noqa: E402
from zotune.models.tiny import make_tiny_model  # noqa: E402
from zotune.rng import noise  # noqa: E402

T, C = 16, 2
TOL = 1e-5
PROMPTS = [
    "Review: great fun\nSentiment (positive or negative):",
    "Review: a dull, overlong and confused mess\nSentiment (positive or negative):",
    "Review: fine\nSentiment:",
    "Review: I loved every minute of it, truly\nSentiment (positive or negative):",
]


def make_batch(tokenizer, rows: int, offset: int = 0):
    texts = [PROMPTS[(offset + i) % len(PROMPTS)] for i in range(rows)]
    enc = tokenizer(texts, padding="max_length", max_length=T, truncation=True, return_tensors="pt")
    ids, am = enc["input_ids"].long(), enc["attention_mask"].long()
    pos = (am.cumsum(1) - 1).clamp_min(0)
    words = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" positive", " negative")]
    choice = torch.tensor([words] * rows, dtype=torch.int64)
    labels = torch.tensor([(offset + i) % 2 for i in range(rows)], dtype=torch.int64)
    return ids, am, pos, choice, labels


class Exported:
    def __init__(self, path, model, adapter, loss, report, q, b, dual, kind):
        self.path, self.model, self.adapter, self.loss = path, model, adapter, loss
        self.report = report
        self.q, self.b, self.dual, self.kind = q, b, dual, kind

    def eager_step(self):
        # The eager engine's own configuration: noise drawn per tensor (not fused).
        return PRGEStep(self.model, self.adapter, self.loss, self.q, dual=self.dual, noise=self.kind)


def _export(tmp_path_factory, tokenizer, family, q, b, dual, kind, targets, name, dynamic_length=False):
    model = make_tiny_model(family, tokenizer, seed=0)
    adapter = LoRAAdapter(model, rank=4, alpha=8, targets=targets)
    loss = ClassificationLoss()
    path = tmp_path_factory.mktemp(name) / f"{name}.pte"
    report = export_program(
        model,
        adapter,
        loss,
        StepSpec(q=q, b=b, seq_len=T, n_choices=C, dual=dual, noise=kind, model_name=f"tiny-{family}"),
        path,
        dynamic_length=dynamic_length,
    )
    return Exported(path, model, adapter, loss, report, q, b, dual, kind)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    # LoRA-FA on every linear of the blocks, dual forwarding, normal noise.
    return _export(tmp_path_factory, tokenizer, "llama", 2, 2, True, "normal", ["all-linear"], "llama")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer):
    # The other branches: q=3, +eps and -eps in separate forwards, Rademacher noise, two targets.
    return _export(
        tmp_path_factory, tokenizer, "qwen2", 3, 2, False, "rademacher", ["q_proj", "v_proj"], "qwen"
    )


def test_symbolic_length_runs_trimmed_batches(qwen, tokenizer, tmp_path_factory):
    """A program with a symbolic length takes a batch without its all-padding columns and
    matches eager PyTorch on the padded batch (exact under the attention mask); a static
    program takes exactly seq_len. (One adapted projection: lowering a symbolic length is slow.)"""
    dyn = _export(tmp_path_factory, tokenizer, "llama", 2, 2, True, "normal", ["q_proj"], "dyn", True)
    assert json.loads(sidecar_path(dyn.path).read_text())["dynamic_length"] is True
    assert json.loads(sidecar_path(qwen.path).read_text())["dynamic_length"] is False
    prog = PteProgram.load(dyn.path)
    step = dyn.eager_step()
    short = ["ok", "fine", "bad", "good"]
    for i in range(2):
        enc = tokenizer(short[2 * i : 2 * i + 2], padding="max_length", max_length=T, return_tensors="pt")
        ids, am = enc["input_ids"].long(), enc["attention_mask"].long()
        pos = (am.cumsum(1) - 1).clamp_min(0)
        words = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" positive", " negative")]
        batch = (ids, am, pos, torch.tensor([words] * 2), torch.tensor([0, 1]))
        trimmed = trim_left_padding(batch, keep=2)
        assert trimmed[0].shape[1] < T  # a few real tokens: most columns are padding
        set_theta(dyn.adapter, prog.get_lora_flat())
        loss_p, g_p = prog.train_step(7 + i, 5e-2, 1e-2, list(trimmed))
        loss_e, g_e = step(torch.tensor([7 + i]), 5e-2, 1e-2, *batch)
        assert abs(loss_p - float(loss_e)) <= 1e-5
        assert float((g_p - g_e).abs().max()) * 2e-2 <= 1e-5
    with pytest.raises(EngineError, match="T=16"):
        PteProgram.load(qwen.path).train_step(1, 1e-2, 1e-2, list(trim_left_padding(batch, keep=2)))


# ---------------------------------------------------------------------------------------------


class _Noise(nn.Module):
    def __init__(self, start, n, kind):
        super().__init__()
        self.start, self.n, self.kind = start, n, kind

    def forward(self, seed):
        return noise(seed, self.start, self.n, self.kind)


def test_rng_program_is_bit_exact(tmp_path):
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.runtime import Runtime

    n, start = 4099, 7
    programs = {}
    for kind in ("normal", "rademacher"):
        ep = torch.export.export(_Noise(start, n, kind), (torch.tensor([1], dtype=torch.int64),))
        et = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
        # Keep the Program alive while its methods run: it owns the constant data (a Method
        # alone reads freed memory once the Program is collected).
        program = Runtime.get().load_program(et.buffer)
        programs[kind] = (program, program.load_method("forward"))
    for seed in (0, 1, 123456789, 2**32 + 17, 2**40 + 3):
        s = torch.tensor([seed], dtype=torch.int64)
        for kind, (_, method) in programs.items():
            got = method.execute([s])[0]
            want = noise(s, start, n, kind)
            assert got.dtype == want.dtype == torch.float32
            assert torch.equal(got, want), (seed, kind)


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_export_report_and_metadata(which, request):
    ex = request.getfixturevalue(which)
    rep = ex.report
    assert ex.path.is_file() and sidecar_path(ex.path).is_file()
    meta = json.loads(sidecar_path(ex.path).read_text())
    assert meta["q"] == ex.q and meta["b"] == ex.b and meta["seq_len"] == T
    assert meta["n_choices"] == C and meta["numel"] == ex.adapter.numel
    assert meta["noise"] == ex.kind and meta["dual"] == ex.dual and meta["quantize"] is None
    assert [d["name"] for d in meta["layout"]["tensors"]] == ex.adapter.layout.names
    assert meta["layout"]["adapter"]["rank"] == 4 and meta["layout"]["adapter"]["alpha"] == 8
    assert meta["layout"]["version"] == LAYOUT_VERSION
    assert meta["size"] == ex.path.stat().st_size
    assert all(v <= TOL for v in rep.check.values()), rep.check
    # The caller's adapter is left as it was (B zero), its tensors now buffers.
    assert not theta_of(ex.adapter).any()
    layer = next(iter(ex.adapter.layers.values()))
    assert "lora_B" in dict(layer.named_buffers())
    assert "lora_B" not in dict(layer.named_parameters())


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_step_parity_with_eager_per_step(which, request, tokenizer):
    ex = request.getfixturevalue(which)
    prog = PteProgram.load(ex.path)
    step = ex.eager_step()
    try:
        for i in range(4):
            batch = make_batch(tokenizer, ex.b, offset=i)
            set_theta(ex.adapter, prog.get_lora_flat())  # re-sync B before each compared step
            loss_p, g_p = prog.train_step(100 + i, 5e-2, 1e-2, batch)
            loss_e, g_e = step(torch.tensor([100 + i]), 5e-2, 1e-2, *batch)
            assert g_p.shape == (ex.q,)
            assert abs(loss_p - float(loss_e)) <= TOL
            assert float((g_p - g_e).abs().max()) * 2e-2 <= TOL  # g = (l+ - l-) / (2 eps)
            d_theta = (prog.get_lora_flat() - theta_of(ex.adapter)).abs().max()
            assert float(d_theta) <= TOL
        assert prog.get_lora_flat().abs().max() > 0  # B moved
        eval_batch = make_batch(tokenizer, ex.b, offset=1)[:4]
        set_theta(ex.adapter, prog.get_lora_flat())
        with torch.no_grad():
            want = ex.loss.logits(ex.model, *eval_batch)
        assert float((prog.forward(*eval_batch) - want).abs().max()) <= TOL
    finally:
        set_theta(ex.adapter, torch.zeros(ex.adapter.numel))


def test_state_is_shared_by_all_methods_and_persists(llama, tokenizer):
    prog = PteProgram.load(llama.path)
    assert not prog.get_lora_flat().any()  # load always initialises B (to zero)
    eval_batch = make_batch(tokenizer, llama.b, offset=2)[:4]
    base = prog.forward(*eval_batch)

    lora = {e.name: torch.randn(e.shape) * 0.05 for e in prog.layout}
    prog.set_lora(lora)
    got = prog.get_lora()
    assert list(got) == llama.adapter.layout.names
    assert all(torch.equal(got[k], lora[k]) for k in lora)
    assert torch.equal(prog.get_lora_flat(), prog.get_lora_flat())  # persists across calls
    after_set = prog.forward(*eval_batch)
    assert not torch.allclose(after_set, base)  # forward sees what set_lora wrote
    try:
        set_theta(llama.adapter, prog.get_lora_flat())
        with torch.no_grad():
            want = llama.loss.logits(llama.model, *eval_batch)
        assert float((after_set - want).abs().max()) <= TOL

        prog.train_step(7, 5e-2, 1e-2, make_batch(tokenizer, llama.b))
        moved = prog.get_lora_flat()
        assert not torch.equal(moved, flatten_dict(lora, prog))  # train_step wrote B ...
        after_step = prog.forward(*eval_batch)  # ... and forward reads the new B
        set_theta(llama.adapter, moved)
        with torch.no_grad():
            want = llama.loss.logits(llama.model, *eval_batch)
        assert float((after_step - want).abs().max()) <= TOL
        assert not torch.equal(after_step, after_set)
    finally:
        set_theta(llama.adapter, torch.zeros(llama.adapter.numel))


def test_engine_surface_and_scores_of_any_row_count(llama, tokenizer):
    from zotune.engines.pte import ExecuTorchEngine

    engine = ExecuTorchEngine(PteProgram.load(llama.path), frozen=llama.adapter.state())
    batch = make_batch(tokenizer, llama.b)
    loss, g = engine.step(batch, 11, 5e-2, 1e-2)
    assert isinstance(loss, float) and g.shape == (llama.q,)
    state = engine.state()
    assert set(state) == {f"param.{n}" for n in llama.adapter.layout.names}
    full = engine.adapter_state()  # B from the program, A from the eager adapter
    assert set(full) == set(llama.adapter.state())
    rows = make_batch(tokenizer, 2 * llama.b + 1, offset=3)  # not a multiple of the eval batch
    try:
        set_theta(llama.adapter, engine.program.get_lora_flat())
        with torch.no_grad():
            want = llama.loss.logits(llama.model, *rows[:4])
        (got,) = engine.scores(rows)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= TOL
    finally:
        set_theta(llama.adapter, torch.zeros(llama.adapter.numel))
    engine.program.set_lora(torch.zeros(llama.adapter.numel))
    engine.load_state(state)
    assert torch.equal(
        engine.program.get_lora_flat(),
        flatten_dict({k[len("param.") :]: v for k, v in state.items()}, engine.program),
    )


def flatten_dict(lora, prog):
    return torch.cat([lora[e.name].reshape(-1) for e in prog.layout])


def test_resume_through_set_lora_is_exact(llama, tokenizer):
    batches = [make_batch(tokenizer, llama.b, offset=i) for i in range(4)]
    straight = PteProgram.load(llama.path)
    first = PteProgram.load(llama.path)  # two live instances must not share state
    for i in range(4):
        straight.train_step(500 + i, 5e-2, 1e-2, batches[i])
        if i < 2:
            first.train_step(500 + i, 5e-2, 1e-2, batches[i])
    saved = first.get_lora()
    del first
    resumed = PteProgram.load(llama.path, lora=saved)
    for i in (2, 3):
        resumed.train_step(500 + i, 5e-2, 1e-2, batches[i])
    assert torch.equal(resumed.get_lora_flat(), straight.get_lora_flat())


def test_batch_of_wrong_shape_is_refused(llama, tokenizer):
    prog = PteProgram.load(llama.path)
    batch = make_batch(tokenizer, llama.b + 1)
    with pytest.raises(EngineError, match="exported for"):
        prog.train_step(1, 1e-3, 1e-2, batch)
    with pytest.raises(EngineError, match="values"):
        prog.set_lora(torch.zeros(prog.numel + 1))
    with pytest.raises(EngineError, match="no tensor"):
        prog.set_lora({})


def test_missing_corrupted_and_mismatched_programs(llama, qwen, tmp_path):
    with pytest.raises(ProgramFileError, match="does not exist"):
        PteProgram.load(tmp_path / "nothing.pte")

    def copy(src, name):
        dst = tmp_path / name
        shutil.copy(src, dst)
        shutil.copy(sidecar_path(src), sidecar_path(dst))
        return dst

    p = copy(llama.path, "no_sidecar.pte")
    sidecar_path(p).unlink()
    with pytest.raises(ProgramFileError, match="metadata file"):
        PteProgram.load(p)

    p = copy(llama.path, "truncated.pte")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProgramFileError, match="truncated"):
        PteProgram.load(p)
    with pytest.raises(ProgramFileError, match="cannot load"):  # the runtime's own refusal
        PteProgram.load(p, verify=False)

    p = copy(llama.path, "garbage.pte")
    data = bytearray(p.read_bytes())
    data[:64] = b"\xde\xad\xbe\xef" * 16
    p.write_bytes(bytes(data))
    with pytest.raises(ProgramFileError, match="sha256"):
        PteProgram.load(p)
    # (Without the hash check ExecuTorch 1.5.1 aborts the whole process on this file: its error
    # logging fails to decode the garbage header.)

    p = copy(llama.path, "garbage.json.pte")
    sidecar_path(p).write_text("{not json")
    with pytest.raises(ProgramFileError, match="JSON"):
        PteProgram.load(p)

    # A program next to the metadata of another one.
    p = copy(llama.path, "swapped.pte")
    shutil.copy(sidecar_path(qwen.path), sidecar_path(p))
    with pytest.raises(ProgramFileError, match="sha256|bytes"):
        PteProgram.load(p)
    with pytest.raises(ProgramFileError, match="belong together"):
        PteProgram.load(p, verify=False)

    # Built for another configuration or adapter than the caller's.
    with pytest.raises(ProgramFileError, match="q: program has 2, expected 4"):
        PteProgram.load(llama.path, q=4, b=2)
    with pytest.raises(ProgramFileError, match="seq_len"):
        PteProgram.load(llama.path, seq_len=T * 2)
    with pytest.raises(ProgramFileError, match="adapter"):
        PteProgram.load(llama.path, adapter=qwen.adapter)
    PteProgram.load(llama.path, adapter=llama.adapter, q=2, b=2, seq_len=T, n_choices=C)


def test_failed_parity_check_writes_nothing(tokenizer, tmp_path):
    model = make_tiny_model("llama", tokenizer, seed=1)
    adapter = LoRAAdapter(model, rank=2, alpha=4, targets=["q_proj"])
    out = tmp_path / "refused.pte"
    with pytest.raises(ExportCheckError, match="nothing was written"):
        # Portable kernels keep this export quick; a negative tolerance makes any result fail.
        export_program(
            model,
            adapter,
            ClassificationLoss(),
            StepSpec(q=1, b=1, seq_len=8, n_choices=2, tolerance=-1.0),
            out,
            xnnpack=False,
        )
    assert list(tmp_path.iterdir()) == []


def test_unsupported_options_are_refused(tokenizer, tmp_path):
    model = make_tiny_model("llama", tokenizer, seed=1)
    adapter = LoRAAdapter(model, rank=2, alpha=4, targets=["q_proj"])
    with pytest.raises(EngineError, match="quantize"):
        export_program(
            model, adapter, ClassificationLoss(), StepSpec(1, 1, 8, 2, quantize="int3"), tmp_path / "x.pte"
        )
    with pytest.raises(EngineError, match="classification"):
        export_program(
            model, adapter, ClassificationLoss(via_head_module=True), StepSpec(1, 1, 8, 2), tmp_path / "x.pte"
        )
    with pytest.raises(EngineError, match="momentum"):
        export_program(
            model, adapter, ClassificationLoss(), StepSpec(1, 1, 8, 2, momentum=1.0), tmp_path / "x.pte"
        )
    assert list(tmp_path.iterdir()) == []


def test_8da4w_matches_quantized_eager(tokenizer, tmp_path):
    model = make_tiny_model("llama", tokenizer, seed=0)
    adapter = LoRAAdapter(model, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    w = model.model.layers[0].mlp.up_proj.weight.clone()
    rep = export_program(
        model,
        adapter,
        ClassificationLoss(),
        StepSpec(q=2, b=2, seq_len=T, n_choices=C, quantize="8da4w"),
        tmp_path / "q.pte",
    )
    assert rep.meta["quantize"] == "8da4w"
    assert all(v <= TOLERANCE["8da4w"][k] for k, v in rep.check.items() if k in TOLERANCE["8da4w"]), rep.check
    # Two layers give activation roundings no room to cascade: with the group scales in bf16
    # (as XNNPACK keeps them) eager and program agree far inside the fp32 tolerance.
    assert rep.check["update"] <= 1e-6 and rep.check["forward"] <= 1e-5, rep.check
    # The caller's model stays fp32 (quantization ran on a copy).
    assert type(model.model.layers[0].mlp.up_proj.weight) is nn.Parameter
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, w)
    prog = PteProgram.load(tmp_path / "q.pte", quantize="8da4w")
    loss, g = prog.train_step(3, 1e-2, 1e-2, make_batch(tokenizer, 2))
    assert torch.isfinite(g).all() and 0 < loss < 10
