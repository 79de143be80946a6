"""The ONNX Runtime engine: the exported stateless P-RGE step against eager PyTorch, theta kept in
ONNX Runtime between steps, resume, the int4 base, and refusal of corrupted or mismatched
programs. Tiny models only; each program is exported once per module."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from test_executorch import C, T, make_batch  # noqa: E402

from zotune.adapters.lora import LoRAAdapter  # noqa: E402
from zotune.adapters.theta import set_theta, theta_of  # noqa: E402
from zotune.engines.export_common import (  # noqa: E402
    FORMAT_VERSION,
    EngineError,
    ExportCheckError,
    ProgramFileError,
    StepSpec,
    sidecar_path,
    trained_to_buffers,
)
from zotune.engines.onnx import TOLERANCE, _to_onnx, eval_path, export_program  # noqa: E402
from zotune.engines.onnx_int4 import base_linears, dequantized_weights  # noqa: E402
from zotune.engines.onnx_weights import MIN_BYTES, load_graph, load_weights, weights_path  # noqa: E402
from zotune.engines.ort import OrtProgram, inference_session  # noqa: E402
from zotune.engines.program import ProgramEngine, load_program  # noqa: E402
from zotune.errors import ZotuneError  # noqa: E402
from zotune.estimators.prge import VELOCITY, PRGEStep  # noqa: E402
from zotune.loss import ClassificationLoss  # noqa: E402
from zotune.models.tiny import make_tiny_model  # noqa: E402
from zotune.rng import noise  # noqa: E402

TOL = 1e-5


class Exported:
    def __init__(self, path, model, adapter, loss, report, q, b, dual, kind, momentum):
        self.path, self.model, self.adapter, self.loss = path, model, adapter, loss
        self.report, self.q, self.b, self.dual, self.kind = report, q, b, dual, kind
        self.momentum = momentum
        # The eager engine's own configuration: noise drawn per tensor (not fused).
        self.step = PRGEStep(model, adapter, loss, q, dual=dual, noise=kind, momentum=momentum)

    def start(self) -> dict:
        """theta at export: zeros for LoRA-FA, A's seeded init for LoRA."""
        return {name: t.detach().clone() for name, t in self.adapter.named_tensors()}


def _export(
    tmp_path_factory,
    tokenizer,
    family,
    q,
    b,
    dual,
    kind,
    targets,
    name,
    *,
    train_a=False,
    momentum=0.0,
    quantize=None,
    dynamic_length=True,
):
    model = make_tiny_model(family, tokenizer, seed=0)
    adapter = LoRAAdapter(model, rank=4, alpha=8, targets=targets, train_a=train_a)
    loss = ClassificationLoss()
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    report = export_program(
        model,
        adapter,
        loss,
        StepSpec(
            q=q,
            b=b,
            seq_len=T,
            n_choices=C,
            dual=dual,
            noise=kind,
            model_name=f"tiny-{family}",
            momentum=momentum,
            quantize=quantize,
        ),
        path,
        threads=1,
        dynamic_length=dynamic_length,
    )
    return Exported(path, model, adapter, loss, report, q, b, dual, kind, momentum)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    # LoRA-FA on every linear of the blocks, dual forwarding, normal noise.
    return _export(tmp_path_factory, tokenizer, "llama", 2, 2, True, "normal", ["all-linear"], "llama")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer):
    # The other branches: LoRA (A trained too), heavy-ball momentum, q=3, +eps and -eps in
    # separate forwards, Rademacher noise, two targets, one static length.
    return _export(
        tmp_path_factory,
        tokenizer,
        "qwen2",
        3,
        2,
        False,
        "rademacher",
        ["q_proj", "v_proj"],
        "qwen",
        train_a=True,
        momentum=0.9,
        dynamic_length=False,
    )


# ---------------------------------------------------------------------------------------------


class _Noise(nn.Module):
    def __init__(self, start, n):
        super().__init__()
        self.start, self.n = start, n

    def forward(self, seed):
        return tuple(noise(seed, self.start, self.n, kind) for kind in ("normal", "rademacher"))


@pytest.mark.parametrize(
    "start",
    [7, 2**33 - 5],  # int32 counters; counters across the 32-bit boundary (the high word hashed too)
)
def test_rng_program_is_bit_exact(start):
    n = 4099
    proto = _to_onnx(_Noise(start, n).eval(), (torch.tensor([1]),), ["seed"], ["normal", "rademacher"])
    ops = {node.op_type for node in proto.graph.node}
    assert "BitShift" in ops and "BitwiseXor" in ops  # the hash is in the graph
    assert "Where" not in ops and "BitwiseOr" not in ops  # uint32 ops, not the int64 chain's shifts
    casts = {a.i for node in proto.graph.node if node.op_type == "Cast" for a in node.attribute}
    assert onnx.TensorProto.UINT32 in casts
    sess = inference_session(proto.SerializeToString(), threads=1)
    for seed in (0, 1, 123456789, 2**32 + 17, 2**40 + 3):
        s = torch.tensor([seed], dtype=torch.int64)
        outs = sess.run(None, {"seed": s.numpy()})
        for kind, got in zip(("normal", "rademacher"), outs):
            got = torch.from_numpy(got)
            want = noise(s, start, n, kind)  # eager: the numpy uint32 path
            assert got.dtype == want.dtype == torch.float32
            assert torch.equal(got, want), (seed, kind)


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_export_report_and_metadata(which, request):
    ex = request.getfixturevalue(which)
    meta = json.loads(sidecar_path(ex.path).read_text())
    assert meta["engine"] == "onnx" and meta["opset"] >= 20 and meta["format"] == FORMAT_VERSION
    assert meta["q"] == ex.q and meta["b"] == ex.b and meta["seq_len"] == T
    assert meta["n_choices"] == C and meta["numel"] == ex.adapter.numel
    assert meta["noise"] == ex.kind and meta["dual"] == ex.dual and meta["quantize"] is None
    assert meta["momentum"] == ex.momentum
    assert meta["dynamic_length"] == (which == "llama")
    assert [d["name"] for d in meta["layout"]["tensors"]] == ex.adapter.layout.names
    assert meta["size"] == ex.path.stat().st_size
    fwd = meta["graphs"]["forward"]
    assert fwd["file"] == eval_path(ex.path).name
    assert fwd["size"] == eval_path(ex.path).stat().st_size
    assert all(v <= TOL for v in ex.report.check.values()), ex.report.check
    assert ("momentum" in ex.report.check) == bool(ex.momentum)
    # Theta and the momentum buffer are graph inputs and outputs, not stored weights.
    proto = onnx.load(str(ex.path), load_external_data=False)
    names = [i.name for i in proto.graph.input]
    assert names[0] == "theta" and ("velocity" in names) == bool(ex.momentum)
    assert [o.name for o in proto.graph.output][-2:] == ["loss", "g"]
    inits = {i.name for i in proto.graph.initializer}
    assert not any("lora_B" in name for name in inits)
    # The base weights are inputs of both graphs, held once in the weights file.
    assert meta["weights"]["file"] == weights_path(ex.path).name
    assert meta["weights"]["size"] == weights_path(ex.path).stat().st_size
    held = load_weights(weights_path(ex.path))
    base = sum(p.numel() * 4 for p in ex.model.parameters())  # tied embedding: counted once
    # Once, not once per graph (a little more: constants such as the rotary tables and LoRA's A).
    assert base <= sum(a.nbytes for a in held.values()) <= 1.1 * base
    for graph in (ex.path, eval_path(ex.path)):
        g = onnx.load(str(graph)).graph
        lifted = [i.name for i in g.input if i.name.startswith("w.")]
        assert lifted and set(lifted) <= set(held)
        assert all(len(i.raw_data) < MIN_BYTES for i in g.initializer)
        assert graph.stat().st_size < base / 4
    # The caller's model keeps its values; the trained tensors are buffers (as for ExecuTorch).
    assert torch.equal(theta_of(ex.adapter), torch.cat([v.reshape(-1) for v in ex.start().values()]))
    assert not hasattr(ex.model, VELOCITY)


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_step_parity_with_eager_per_step(which, request, tokenizer):
    ex = request.getfixturevalue(which)
    start = ex.start()
    prog = OrtProgram.load(ex.path, lora=start)
    try:
        for i in range(4):
            batch = make_batch(tokenizer, ex.b, offset=i)
            set_theta(ex.adapter, prog.get_lora_flat())  # re-sync theta before each step
            for v, m in zip(ex.step.velocity or [], prog.get_momentum().values()):
                v.copy_(m)
            loss_p, g_p = prog.train_step(100 + i, 5e-2, 1e-2, batch)
            loss_e, g_e = ex.step(torch.tensor([100 + i]), 5e-2, 1e-2, *batch)
            assert g_p.shape == (ex.q,)
            assert abs(loss_p - float(loss_e)) <= TOL
            assert float((g_p - g_e).abs().max()) * 2e-2 <= TOL  # g = (l+ - l-) / (2 eps)
            assert float((prog.get_lora_flat() - theta_of(ex.adapter)).abs().max()) <= TOL
            if ex.momentum:
                got = torch.cat([v.reshape(-1) for v in prog.get_momentum().values()])
                want = torch.cat([v.reshape(-1) for v in ex.step.velocity])
                assert got.abs().max() > 0 and float((got - want).abs().max()) <= TOL
        assert not torch.equal(prog.get_lora_flat(), theta_of(ex.adapter) * 0)
        eval_batch = make_batch(tokenizer, 5, offset=1)  # not a multiple of the eval batch
        set_theta(ex.adapter, prog.get_lora_flat())
        with torch.no_grad():
            want = ex.loss.logits(ex.model, *eval_batch[:4])
        got = prog.scores(*eval_batch[:4])
        assert got.shape == want.shape and float((got - want).abs().max()) <= TOL
    finally:
        set_theta(ex.adapter, torch.cat([v.reshape(-1) for v in start.values()]))
        for v in ex.step.velocity or []:
            v.zero_()


def test_theta_stays_in_two_ort_buffers(llama, tokenizer):
    """Each step reads one ONNX Runtime buffer and writes the other: the same two buffers
    (addresses) for the whole run, and forward reads whichever is current."""
    prog = OrtProgram.load(llama.path)
    pair = prog.pair
    ptrs = {v.data_ptr() for v in pair.theta}
    assert len(ptrs) == 2
    seen = []
    for i in range(4):
        before = pair.cur
        prog.train_step(40 + i, 5e-2, 1e-2, make_batch(tokenizer, llama.b, offset=i))
        assert pair.cur == 1 - before
        seen.append(pair.theta[pair.cur].data_ptr())
    assert set(seen) == ptrs and seen[0] != seen[1]
    assert {v.data_ptr() for v in pair.theta} == ptrs
    # forward and get_lora see the buffer the last step wrote.
    eval_batch = make_batch(tokenizer, llama.b, offset=2)[:4]
    flat = prog.get_lora_flat()
    assert flat.abs().max() > 0
    try:
        set_theta(llama.adapter, flat)
        with torch.no_grad():
            want = llama.loss.logits(llama.model, *eval_batch)
        assert float((prog.forward(*eval_batch) - want).abs().max()) <= TOL
    finally:
        set_theta(llama.adapter, torch.zeros(llama.adapter.numel))


def test_engine_surface_resume_and_dispatch(qwen, tokenizer):
    """ProgramEngine state round trip (theta and momentum) resumes bit for bit; two loaded
    instances do not share state; load_program picks ONNX Runtime from the metadata."""
    batches = [make_batch(tokenizer, qwen.b, offset=i) for i in range(4)]
    straight = ProgramEngine(load_program(qwen.path, lora=qwen.start()))
    first = ProgramEngine(load_program(qwen.path, lora=qwen.start()))
    assert isinstance(straight.program, OrtProgram) and straight.name == "onnx"
    for i in range(4):
        straight.step(batches[i], 500 + i, 5e-2, 1e-2)
        if i < 2:
            first.step(batches[i], 500 + i, 5e-2, 1e-2)
    state = first.state()
    assert {k.split(".", 1)[0] for k in state} == {"param", "momentum"}
    del first
    resumed = ProgramEngine(load_program(qwen.path, lora=qwen.start()))
    resumed.load_state(state)
    for i in (2, 3):
        resumed.step(batches[i], 500 + i, 5e-2, 1e-2)
    a, b = resumed.state(), straight.state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dynamic_length_runs_trimmed_batches_like_eager(llama, qwen, tokenizer):
    """A program of symbolic length takes each batch without its all-padding columns (as the
    eager engine does) and matches eager at every length; a static one takes only T."""
    from zotune.loss import trim_left_padding

    engine = ProgramEngine(OrtProgram.load(llama.path))
    assert engine.program.dynamic_length
    inputs = {i.name: i.shape for i in engine.program.pair.step.get_inputs()}
    assert inputs["input_ids"] == [llama.b, "T"]
    prompts = _short_batch(tokenizer, ["Review: fine\nSentiment:", "Review: bad\nSentiment:"])
    trimmed = trim_left_padding(prompts, keep=2)
    assert 2 <= trimmed[0].shape[1] < T
    try:
        for i, batch in enumerate(
            (prompts, tuple(t[:, -3:] if t.dim() == 2 and t.shape[1] == T else t for t in prompts))
        ):
            set_theta(llama.adapter, engine.program.get_lora_flat())
            loss_p, g_p = engine.step(batch, 60 + i, 5e-2, 1e-2)
            loss_e, g_e = llama.step(torch.tensor([60 + i]), 5e-2, 1e-2, *trim_left_padding(batch, keep=2))
            assert abs(loss_p - float(loss_e)) <= TOL
            assert float((g_p - g_e).abs().max()) * 2e-2 <= TOL
            assert float((engine.program.get_lora_flat() - theta_of(llama.adapter)).abs().max()) <= TOL
        set_theta(llama.adapter, engine.program.get_lora_flat())
        with torch.no_grad():
            want = llama.loss.logits(llama.model, *prompts[:4])
        (got,) = engine.scores(prompts)
        assert float((got - want).abs().max()) <= TOL
    finally:
        set_theta(llama.adapter, torch.zeros(llama.adapter.numel))
    longer = tuple(torch.cat([t, t[:, :1]], 1) if t.dim() == 2 and t.shape[1] == T else t for t in prompts)
    with pytest.raises(EngineError, match="exported for"):
        engine.program.train_step(1, 1e-3, 1e-2, longer)
    static = OrtProgram.load(qwen.path, lora=qwen.start())
    assert not static.dynamic_length
    with pytest.raises(EngineError, match="exported for"):
        static.train_step(1, 1e-3, 1e-2, trimmed)


def _short_batch(tokenizer, texts):
    """make_batch's layout for prompts much shorter than T (left padding on every row)."""
    enc = tokenizer(texts, padding="max_length", max_length=T, return_tensors="pt")
    ids, am = enc["input_ids"].long(), enc["attention_mask"].long()
    pos = (am.cumsum(1) - 1).clamp_min(0)
    words = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" positive", " negative")]
    choice = torch.tensor([words] * len(texts), dtype=torch.int64)
    return ids, am, pos, choice, torch.arange(len(texts), dtype=torch.int64) % 2


def test_batch_of_wrong_shape_is_refused(llama, tokenizer):
    prog = OrtProgram.load(llama.path)
    with pytest.raises(EngineError, match="exported for"):
        prog.train_step(1, 1e-3, 1e-2, make_batch(tokenizer, llama.b + 1))
    with pytest.raises(EngineError, match="values"):
        prog.set_lora(torch.zeros(prog.numel + 1))
    with pytest.raises(EngineError, match="finite"):
        prog.set_lora(torch.full((prog.numel,), float("nan")))


def test_missing_corrupted_and_mismatched_programs(llama, qwen, tmp_path):
    with pytest.raises(ProgramFileError, match="does not exist"):
        OrtProgram.load(tmp_path / "nothing.onnx")

    def copy_program(src, name):
        dst = tmp_path / name
        for path_of in (lambda x: x, sidecar_path, eval_path, weights_path):
            shutil.copy(path_of(src), path_of(dst))
        meta = json.loads(sidecar_path(dst).read_text())
        meta["graphs"]["forward"]["file"] = eval_path(dst).name
        meta["weights"]["file"] = weights_path(dst).name
        sidecar_path(dst).write_text(json.dumps(meta))
        return dst

    p = copy_program(llama.path, "no_sidecar.onnx")
    sidecar_path(p).unlink()
    with pytest.raises(ProgramFileError, match="metadata file"):
        OrtProgram.load(p)

    p = copy_program(llama.path, "truncated.onnx")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProgramFileError, match="truncated"):
        OrtProgram.load(p)
    with pytest.raises(ProgramFileError, match="ONNX Runtime cannot load"):  # its own refusal
        OrtProgram.load(p, verify=False)

    p = copy_program(llama.path, "garbage.onnx")
    data = bytearray(p.read_bytes())
    data[:64] = b"\xde\xad\xbe\xef" * 16
    p.write_bytes(bytes(data))
    with pytest.raises(ProgramFileError, match="sha256"):
        OrtProgram.load(p)

    p = copy_program(llama.path, "no_eval.onnx")
    eval_path(p).unlink()
    with pytest.raises(ProgramFileError, match="evaluation program"):
        OrtProgram.load(p)

    p = copy_program(llama.path, "bad_eval.onnx")
    eval_path(p).write_bytes(eval_path(p).read_bytes()[:1000])
    with pytest.raises(ProgramFileError, match="truncated"):
        OrtProgram.load(p)

    # The base weights both graphs take: missing, truncated, not safetensors, another program's.
    p = copy_program(llama.path, "no_weights.onnx")
    weights_path(p).unlink()
    with pytest.raises(ProgramFileError, match="weights file no_weights.onnx.weights.safetensors is missing"):
        OrtProgram.load(p)
    p = copy_program(llama.path, "bad_weights.onnx")
    weights_path(p).write_bytes(weights_path(p).read_bytes()[:1000])
    with pytest.raises(ProgramFileError, match="truncated"):
        OrtProgram.load(p)
    with pytest.raises(ZotuneError, match="expected a safetensors weights file"):
        OrtProgram.load(p, verify=False)
    shutil.copy(weights_path(qwen.path), weights_path(p))
    with pytest.raises(ProgramFileError, match="does not hold"):
        OrtProgram.load(p, verify=False)

    # A program next to the metadata of another one.
    p = copy_program(llama.path, "swapped.onnx")
    shutil.copy(sidecar_path(qwen.path), sidecar_path(p))
    with pytest.raises(ProgramFileError, match="sha256|bytes"):
        OrtProgram.load(p)
    shutil.copy(eval_path(qwen.path), eval_path(p))
    shutil.copy(weights_path(qwen.path), weights_path(p))
    with pytest.raises(ProgramFileError, match="belong together"):
        OrtProgram.load(p, verify=False)

    # A .pte opened as ONNX, and the other way round.
    with pytest.raises(ProgramFileError, match="not the metadata of a zotune onnx program"):
        sidecar = json.loads(sidecar_path(llama.path).read_text())
        q = tmp_path / "other.onnx"
        shutil.copy(llama.path, q)
        sidecar_path(q).write_text(json.dumps({**sidecar, "engine": "executorch"}))
        OrtProgram.load(q)

    # Built for another configuration or adapter than the caller's.
    with pytest.raises(ProgramFileError, match="q: program has 2, expected 4"):
        OrtProgram.load(llama.path, q=4, b=2)
    with pytest.raises(ProgramFileError, match="seq_len"):
        OrtProgram.load(llama.path, seq_len=T * 2)
    with pytest.raises(ProgramFileError, match="momentum"):
        OrtProgram.load(llama.path, momentum=0.9)
    with pytest.raises(ProgramFileError, match="adapter"):
        OrtProgram.load(llama.path, adapter=qwen.adapter)
    OrtProgram.load(llama.path, adapter=llama.adapter, q=2, b=2, seq_len=T, n_choices=C)


def test_failed_parity_check_writes_nothing(tokenizer, tmp_path):
    model = make_tiny_model("llama", tokenizer, seed=1)
    adapter = LoRAAdapter(model, rank=2, alpha=4, targets=["q_proj"])
    out = tmp_path / "refused.onnx"
    with pytest.raises(ExportCheckError, match="nothing was written"):
        # A negative tolerance makes any result fail.
        export_program(
            model,
            adapter,
            ClassificationLoss(),
            StepSpec(q=1, b=1, seq_len=8, n_choices=2, tolerance=-1.0),
            out,
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EngineError, match="quantize"):
        export_program(model, adapter, ClassificationLoss(), StepSpec(1, 1, 8, 2, quantize="8da4w"), out)
    with pytest.raises(EngineError, match="block size"):
        export_program(
            model, adapter, ClassificationLoss(), StepSpec(1, 1, 8, 2, quantize="int4"), out, block_size=48
        )
    with pytest.raises(EngineError, match="classification"):
        export_program(model, adapter, ClassificationLoss(via_head_module=True), StepSpec(1, 1, 8, 2), out)
    with pytest.raises(EngineError, match="int4 layers"):
        export_program(model, adapter, ClassificationLoss(), StepSpec(1, 1, 8, 2), out, int4_layers="mlp")
    assert list(tmp_path.iterdir()) == []


def test_int4_on_chosen_layers_only(tokenizer, tmp_path):
    """int4_layers: only the base linears whose name matches become MatMulNBits; the others stay
    fp32 MatMuls, and the program still matches eager on the dequantized weights."""
    model = make_tiny_model("llama", tokenizer, seed=0)
    adapter = LoRAAdapter(model, rank=4, alpha=8, targets=["q_proj", "down_proj"])
    spec = StepSpec(q=2, b=2, seq_len=T, n_choices=C, quantize="int4")
    path = tmp_path / "mlp.onnx"
    rep = export_program(model, adapter, ClassificationLoss(), spec, path, int4_layers=r"\.mlp\.", threads=1)
    assert all(v <= TOLERANCE["int4"][k] for k, v in rep.check.items()), rep.check
    chosen = sorted(fqn for fqn, _ in rep.meta["quantized"].values())
    assert chosen == sorted(f for f in base_linears(model, adapter) if ".mlp." in f) and len(chosen) == 2 * 3
    assert rep.meta["int4_layers"] == r"\.mlp\."
    nbits = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(chosen)
    with pytest.raises(EngineError, match="matches no base linear"):
        export_program(model, adapter, ClassificationLoss(), spec, tmp_path / "x.onnx", int4_layers="nope")
    assert not (tmp_path / "x.onnx").exists()


def test_int4_hqq_base(tokenizer, tmp_path):
    """int4-hqq: HQQ-fitted blocks (scale and zero point per block, no calibration data) on every
    base linear; the program matches eager on the weights ONNX Runtime dequantizes."""
    model = make_tiny_model("llama", tokenizer, seed=0)
    adapter = LoRAAdapter(model, rank=4, alpha=8, targets=["q_proj", "down_proj"])
    path = tmp_path / "hqq.onnx"
    spec = StepSpec(q=2, b=2, seq_len=T, n_choices=C, quantize="int4-hqq")
    rep = export_program(model, adapter, ClassificationLoss(), spec, path, block_size=32, threads=1)
    assert all(v <= TOLERANCE["int4-hqq"][k] for k, v in rep.check.items()), rep.check
    names = {node: tuple(v) for node, v in rep.meta["quantized"].items()}
    assert sorted(fqn for fqn, _ in names.values()) == sorted(base_linears(model, adapter))
    for fqn, wq in dequantized_weights(load_graph(path), names).items():
        wf = model.get_submodule(fqn).weight
        assert 0 < float((wq - wf).abs().max()) <= float(wf.abs().max()) / 7  # a 4-bit grid
    prog = OrtProgram.load(path, quantize="int4-hqq")
    loss, g = prog.train_step(1, 1e-2, 1e-2, make_batch(tokenizer, 2))
    assert g.shape == (2,) and torch.isfinite(g).all() and loss > 0


def test_int4_base_with_fp32_adapter(tokenizer, tmp_path):
    """int4: every frozen base linear of the decoder becomes MatMulNBits (float activations),
    nothing else does; ONNX Runtime matches eager computing with its dequantized weights, per
    step; the caller's model stays fp32."""
    model = make_tiny_model("llama", tokenizer, seed=0)
    adapter = LoRAAdapter(model, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    w = model.model.layers[0].mlp.up_proj.weight.clone()
    path = tmp_path / "q.onnx"
    rep = export_program(
        model,
        adapter,
        ClassificationLoss(),
        StepSpec(q=2, b=2, seq_len=T, n_choices=C, quantize="int4"),
        path,
        block_size=32,
        threads=1,
    )
    assert all(v <= TOLERANCE["int4"][k] for k, v in rep.check.items()), rep.check
    assert rep.check["update"] <= 1e-6, rep.check
    n_base = len(base_linears(model, adapter))
    assert n_base == 2 * 7 and len(rep.meta["quantized"]) == n_base
    assert rep.meta["quantize"] == "int4" and rep.meta["block_size"] == 32
    for graph in (path, eval_path(path)):
        proto = onnx.load(str(graph))
        nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == n_base
        attrs = {a.name: a.i for a in nbits[0].attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 1
        # LoRA's A (a constant) and the label-word scoring stay fp32 MatMuls.
        assert sum(n.op_type == "MatMul" for n in proto.graph.node) >= len(adapter.layers)
    assert type(model.model.layers[0].mlp.up_proj.weight) is nn.Parameter
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, w)

    # Per step against eager on the dequantized weights, theta re-synced.
    ref, ref_adapter = copy.deepcopy((model, adapter))
    trained_to_buffers(ref_adapter)
    names = {node: tuple(v) for node, v in rep.meta["quantized"].items()}
    deq = dequantized_weights(load_graph(path), names)
    assert sorted(fqn for fqn, _ in names.values()) == sorted(base_linears(model, adapter))
    with torch.no_grad():
        for fqn, wq in deq.items():
            wf = ref.get_submodule(fqn).weight
            assert 0 < float((wq - wf).abs().max()) <= float(wf.abs().max()) / 7  # 4-bit error
            wf.copy_(wq)
    step = PRGEStep(ref, ref_adapter, ClassificationLoss(), 2)
    prog = OrtProgram.load(path, quantize="int4")
    for i in range(3):
        batch = make_batch(tokenizer, 2, offset=i)
        set_theta(ref_adapter, prog.get_lora_flat())
        loss_p, g_p = prog.train_step(9 + i, 5e-2, 1e-2, batch)
        loss_e, g_e = step(torch.tensor([9 + i]), 5e-2, 1e-2, *batch)
        assert abs(loss_p - float(loss_e)) <= TOLERANCE["int4"]["loss"]
        assert float((g_p - g_e).abs().max()) * 2e-2 <= TOLERANCE["int4"]["loss_diff"]
        assert float((prog.get_lora_flat() - theta_of(ref_adapter)).abs().max()) <= TOL
