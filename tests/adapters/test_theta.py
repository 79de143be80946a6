"""theta's layout: construction from adapters, the versioned JSON form, and moving values in and
out of the flat vector; the counters it hands out are the ones the noise stream uses."""

import pytest
import torch

from zotune.adapters.full import FullParams
from zotune.adapters.lora import LoRAAdapter
from zotune.adapters.theta import LAYOUT_VERSION, LayoutError, ThetaLayout, set_theta, theta_of
from zotune.models.tiny import make_tiny_model
from zotune.rng import noise


def test_lora_layout_is_end_to_end_in_adapter_order(tokenizer):
    model = make_tiny_model("llama", tokenizer)
    adapter = LoRAAdapter(model, rank=4, alpha=8, train_a=True, targets=["q_proj", "v_proj"])
    layout = adapter.layout
    names = [f"{n}.{k}" for n in adapter.layers for k in ("lora_A", "lora_B")]
    assert layout.names == names
    offset = 0
    for e, t in zip(layout, adapter.tensors()):
        assert e.offset == offset and e.shape == tuple(t.shape)
        offset += t.numel()
    assert layout.numel == offset == adapter.numel
    assert layout.adapter["kind"] == "lora" and layout.adapter["rank"] == 4
    assert [row[0] for row in layout.adapter["layers"]] == list(adapter.layers)


def test_json_round_trip_and_refusals():
    layout = ThetaLayout.from_shapes([("a", (2, 3)), ("b", (4,))], "float32", {"kind": "lora-fa"})
    data = layout.to_json()
    assert data["version"] == LAYOUT_VERSION and data["numel"] == 10
    assert ThetaLayout.from_json(data) == layout
    with pytest.raises(LayoutError, match="no layout version"):
        ThetaLayout.from_json({"numel": 10, "tensors": data["tensors"]})
    with pytest.raises(LayoutError, match="version 99"):
        ThetaLayout.from_json({**data, "version": 99})
    with pytest.raises(LayoutError, match="numel 11"):
        ThetaLayout.from_json({**data, "numel": 11})
    moved = [dict(d) for d in data["tensors"]]
    moved[1]["offset"] = 7
    with pytest.raises(LayoutError, match="end to end"):
        ThetaLayout.from_json({**data, "tensors": moved})
    with pytest.raises(LayoutError, match="malformed"):
        ThetaLayout.from_json({**data, "tensors": [{"name": "a"}]})


def test_views_gather_scatter(tokenizer):
    model = make_tiny_model("qwen2", tokenizer)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    layout = adapter.layout
    flat = torch.randn(layout.numel)
    set_theta(adapter, flat)
    assert torch.equal(theta_of(adapter), flat)
    views = layout.views(flat)
    for (name, t), e in zip(adapter.named_tensors(), layout):
        assert torch.equal(t, views[name]) and views[name].shape == e.shape
    views[layout.names[0]].zero_()  # a 1-D vector's views write through
    assert not flat[: layout.entries[0].numel].any()
    stack = torch.randn(3, layout.numel)  # leading dims are kept
    for name, v in layout.views(stack).items():
        assert v.shape == (3, *layout.entry(name).shape)
    assert torch.equal(layout.gather(list(layout.views(stack[1]).values())), stack[1])
    by_name = layout.split(flat)
    assert torch.equal(layout.gather(by_name), flat)
    with pytest.raises(LayoutError, match="no tensor"):
        layout.gather({})
    wrong = {**by_name, layout.names[0]: torch.zeros(1)}
    with pytest.raises(LayoutError, match="shape"):
        layout.gather(wrong)


def test_counters_and_spans_match_the_fused_stream(tokenizer):
    model = make_tiny_model("gpt2", tokenizer)
    params = FullParams(model)
    layout, q, seed = params.layout, 3, torch.tensor([5])
    whole = noise(seed, 0, q * layout.numel, "normal").reshape(q, layout.numel)
    views = layout.views(whole)
    e = layout.entries[len(layout) // 2]
    start, n = layout.span(e.name, query=2)
    assert torch.equal(noise(seed, start, n, "normal").view(e.shape), views[e.name][2])
    idx = layout.counters(e, torch.arange(q))
    assert idx.shape == (q, e.numel) and int(idx[1, 0]) == layout.numel + e.offset
    assert layout.mismatch(FullParams(make_tiny_model("gpt2", tokenizer)).layout) is None
    other = LoRAAdapter(make_tiny_model("gpt2", tokenizer), rank=2, alpha=4).layout
    assert "kind" in layout.mismatch(other)
