import os
from pathlib import Path

import pytest
import torch

from zotune.errors import ModelError, ZotuneError
from zotune.models import load_model, load_tokenizer, resolve
from zotune.models.loader import _embedded_gguf
from zotune.models.tiny import save_tiny_model


def test_local_folder_of_each_family(tmp_path, tokenizer, family):
    folder = save_tiny_model(family, tokenizer, tmp_path / family)
    model, tok, source = load_model(str(folder))
    assert source.kind == "folder" and model.config.model_type == family
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert not model.training and model.dtype == torch.float32
    assert load_model(str(folder), dtype="float64")[0].dtype == torch.float64


def test_embedded_model_is_real_smollm2():
    model, tok, source = load_model("smollm2-135m")
    assert source.kind == "embedded" and type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(tok) == 49152
    assert len(tok(" positive", add_special_tokens=False).input_ids) == 1
    # The converted copy is cached as safetensors and reused.
    assert resolve("smollm2-135m").path == source.path
    assert os.path.isfile(os.path.join(source.path, "model.safetensors"))


@pytest.mark.slow
def test_gguf_file_is_converted_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    gguf = _embedded_gguf("smollm2-135m")
    first = resolve(str(gguf))
    assert first.kind == "gguf" and (tmp_path / "cache") in Path(first.path).parents
    mtime = os.path.getmtime(first.path + "/model.safetensors")
    assert resolve(str(gguf)).path == first.path
    assert os.path.getmtime(first.path + "/model.safetensors") == mtime
    tok = load_tokenizer(str(gguf))
    assert len(tok) == 49152


def test_bad_model_inputs(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json is missing"):
        resolve(str(tmp_path / "empty"))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="only from safetensors or GGUF"):
        resolve(str(tmp_path / "pickled"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ZotuneError, match=r"bad\.gguf: .*not a GGUF file.*; expected a GGUF file"):
        load_model(str(bad))
    with pytest.raises(ModelError, match="dtype"):
        load_model("smollm2-135m", dtype="int3")


def test_hub_id_without_a_hub_gives_a_clear_error():
    with pytest.raises(ModelError, match="could not load from the model hub"):
        load_model("someone/some-model-that-is-not-cached")
