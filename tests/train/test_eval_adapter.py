"""`zotune eval` scores an adapter with its own rank and lora_alpha, whatever the config says."""

import json

import pytest

from helpers import args_for, randomize, refused
from zotune.adapters.lora import LoRAAdapter
from zotune.adapters.peft_io import save_peft
from zotune.cli import main
from zotune.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore")


def evaluated(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def write_adapter(folder, model_dir, alpha: float, b_factor: float):
    """A rank-4 adapter of the tiny model with a seeded random B (times b_factor)."""
    model, _, _ = load_model(model_dir)
    adapter = LoRAAdapter(model, rank=4, alpha=alpha)
    randomize([layer.lora_B for layer in adapter.layers.values()], std=0.5)
    state = {k: v * b_factor if k.endswith("lora_B") else v for k, v in adapter.state().items()}
    save_peft(folder, state, list(adapter.layers), 4, alpha, model_dir, adapter.fan_in_fan_out)


def test_eval_uses_the_adapters_rank_and_alpha(capsys, tmp_path, tiny_folder, cls_jsonl):
    args = args_for(tiny_folder, cls_jsonl, tmp_path / "unused")  # adapter.rank 4, adapter.alpha 8
    write_adapter(tmp_path / "a8", tiny_folder, 8.0, 1.0)
    write_adapter(tmp_path / "a16", tiny_folder, 16.0, 0.5)  # (16 / 4) * B / 2 == (8 / 4) * B exactly
    base = evaluated(capsys, ["eval", *args])
    ref = evaluated(capsys, ["eval", *args, "--adapter", str(tmp_path / "a8")])
    assert ref["loss"] != base["loss"]  # the adapter changes the scores
    # A config with another rank and alpha: the adapter's own are used.
    other = args_for(tiny_folder, cls_jsonl, tmp_path / "unused", **{"adapter.rank": 8, "adapter.alpha": 32})
    assert evaluated(capsys, ["eval", *other, "--adapter", str(tmp_path / "a8")]) == ref
    assert evaluated(capsys, ["eval", *args, "--adapter", str(tmp_path / "a16")]) == ref

    config = tmp_path / "a16" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": "big"}))
    line = refused(capsys, ["eval", *args, "--adapter", str(tmp_path / "a16")])
    assert f"{config}: field 'lora_alpha': expected a positive number" in line
