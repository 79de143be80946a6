"""The saved adapter loaded by PEFT on the same base gives zotune's logits."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

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


def test_peft_finds_the_base_itself_and_reads_every_key(tiny_folder, tmp_path):
    """adapter_config.json is LoraConfig's (no key PEFT does not know) and names the base as a
    folder PEFT loads: AutoPeftModelForCausalLM needs nothing but the adapter folder."""
    from peft import AutoPeftModelForCausalLM, LoraConfig

    from zotune.models import load_model

    model, _, _ = load_model(tiny_folder)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    randomize(adapter.tensors(), std=0.2)
    ids, mask, pos, _, _ = synthetic_batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    save_peft(
        tmp_path / "a", adapter.state(), list(adapter.layers), 4, 8.0, tiny_folder, extra={"kind": "lora"}
    )
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(config) <= set(LoraConfig().to_dict())
    assert config["base_model_name_or_path"] == str(Path(tiny_folder).resolve())
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["zotune"]) == {"model": tiny_folder, "kind": "lora"}
    with torch.no_grad():
        peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
        theirs = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == (
        save_peft(tmp_path / "b", adapter.state(), list(adapter.layers), 4, 8.0, tiny_folder)
        / "adapter_config.json"
    ).read_bytes()
