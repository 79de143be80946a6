"""Adapters where people serve models: the llama.cpp GGUF adapter read back with gguf-py, and the
merged safetensors model against base + adapter."""

import json

import gguf
import numpy as np
import pytest
import torch

from helpers import randomize
from zotune.adapters.gguf_io import permute_rows
from zotune.adapters.lora import LoRAAdapter
from zotune.adapters.peft_io import save_peft
from zotune.cli import main
from zotune.models import load_model


@pytest.fixture
def adapter_dir(tmp_path, tiny_folder):
    model, _, _ = load_model(tiny_folder)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    randomize(adapter.tensors(), std=0.2)
    folder = save_peft(tmp_path / "adapter", adapter.state(), list(adapter.layers), 4, 8.0, tiny_folder)
    return folder, adapter.state()


def test_gguf_adapter_reads_back(tmp_path, adapter_dir, tiny_folder):
    folder, state = adapter_dir
    out = tmp_path / "x.gguf"
    assert main(["export-adapter", str(folder), "--format", "gguf", "--out", str(out)]) == 0
    r = gguf.GGUFReader(out)
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    tensors = {t.name: t for t in r.tensors}
    config = json.loads((folder / "adapter_config.json").read_text())
    hf = json.loads(open(f"{tiny_folder}/config.json").read())
    n_layers = hf["num_hidden_layers"]
    gg = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    assert len(tensors) == 2 * 7 * n_layers and config["r"] == 4
    for i in range(n_layers):
        for hf_name, g in gg.items():
            layer = f"model.layers.{i}.{hf_name}"
            a, b = tensors[f"blk.{i}.{g}.weight.lora_a"], tensors[f"blk.{i}.{g}.weight.lora_b"]
            A, B = state[f"{layer}.lora_A"], state[f"{layer}.lora_B"]
            # gguf-py reports ne (innermost first): lora_a ne [d_in, r], lora_b ne [r, d_out]
            assert list(a.shape) == [A.shape[1], 4] and list(b.shape) == [4, B.shape[0]]
            np.testing.assert_array_equal(np.asarray(a.data).reshape(A.shape), A.numpy())
            got_b = torch.from_numpy(np.asarray(b.data).reshape(B.shape).copy())
            if g in ("attn_q", "attn_k"):
                heads = hf["num_attention_heads"] if g == "attn_q" else hf["num_key_value_heads"]
                hd = B.shape[0] // heads
                # llama.cpp's rotary layout: within each head, rows (0, hd/2, 1, hd/2+1, ...)
                order = [h * hd + j // 2 + (j % 2) * (hd // 2) for h in range(heads) for j in range(hd)]
                assert torch.equal(got_b, B[order]) and not torch.equal(got_b, B)
                n_kv = hf["num_key_value_heads"] if g == "attn_k" else None
                assert torch.equal(permute_rows(B, hf["num_attention_heads"], n_kv), B[order])
            else:
                assert torch.equal(got_b, B)


def test_merged_model_equals_base_plus_adapter(tmp_path, adapter_dir, tiny_folder, tokenizer):
    folder, state = adapter_dir
    out = tmp_path / "merged"
    assert main(["export-adapter", str(folder), "--merge", "--out", str(out)]) == 0
    assert any(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()
    merged, _, _ = load_model(str(out))
    base, _, _ = load_model(tiny_folder)
    adapter = LoRAAdapter(base, rank=4, alpha=8)
    adapter.load_state(state)
    ids = torch.tensor([tokenizer("merged weights give the same logits")["input_ids"]])
    with torch.no_grad():
        want, got = base(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-4 and want.abs().max() > 0.1


def test_bad_adapter_folder_exits_2(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["export-adapter", str(tmp_path / "nope"), "--format", "gguf", "--out", str(out)]) == 2
    assert "expected adapter_config.json" in capsys.readouterr().err and not out.exists()
