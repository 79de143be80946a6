"""The saved adapter loaded by PEFT on the same base gives zotune's logits."""

import json

import pytest
import torch
from peft import PeftModel

from helpers import randomize, synthetic_batch
from zotune.adapters.lora import LoRAAdapter
from zotune.adapters.peft_io import load_peft, save_peft
from zotune.errors import ZotuneError
from zotune.models.tiny import make_tiny_model


def test_peft_loads_the_adapter_with_equal_logits(family, tokenizer, tmp_path):
    model = make_tiny_model(family, tokenizer, seed=1)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    randomize(adapter.tensors(), std=0.2)
    ids, mask, pos, _, _ = synthetic_batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    save_peft(
        tmp_path / "adapter", adapter.state(), list(adapter.layers), 4, 8.0, "tiny", adapter.fan_in_fan_out
    )
    base = make_tiny_model(family, tokenizer, seed=1)
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        theirs = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter does change the output
    assert (ours - theirs).abs().max() <= 1e-5


def test_config_fields_and_round_trip(tmp_path, tokenizer):
    adapter = LoRAAdapter(make_tiny_model("llama", tokenizer), rank=4, alpha=8)
    randomize(adapter.tensors())
    save_peft(tmp_path / "a", adapter.state(), list(adapter.layers), 4, 8.0, "smollm2-135m")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    _, state = load_peft(tmp_path / "a")
    assert all(torch.equal(state[k], v) for k, v in adapter.state().items())


def test_bad_adapter_folders(tmp_path):
    with pytest.raises(ZotuneError, match="expected adapter_config.json"):
        load_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ZotuneError, match="unreadable"):
        load_peft(tmp_path)
