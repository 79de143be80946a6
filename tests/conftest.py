import json

import pytest
import torch

# Tiny models run fastest on one thread, and a shared machine makes two threads much slower.
torch.set_num_threads(1)

from zotune.config import Config  # noqa: E402 (after the thread count)
from zotune.models.loader import load_tokenizer  # noqa: E402
from zotune.models.tiny import make_tiny_model, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (real vocabulary, left padding)."""
    return load_tokenizer("smollm2-135m")


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def family(request):
    return request.param


@pytest.fixture
def tiny_model(family, tokenizer):
    return make_tiny_model(family, tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a Hugging Face folder (config.json + safetensors + tokenizer)."""
    return str(save_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("tiny-llama")))


WORDS = {
    "positive": ["good", "great", "fine", "lovely", "superb"],
    "negative": ["bad", "awful", "poor", "nasty", "dreadful"],
}


@pytest.fixture(scope="session")
def cls_jsonl(tmp_path_factory):
    """A small two-class sentiment file in the {"input", "label"} shape."""
    path = tmp_path_factory.mktemp("data") / "sentiment.jsonl"
    rows = []
    for i in range(80):
        label = "positive" if i % 2 == 0 else "negative"
        word = WORDS[label][i % 5]
        rows.append({"input": f"item {i} was {word}", "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_config(model: str, data: str, out_dir, **overrides) -> Config:
    """A config for a seconds-long run on a tiny model; overrides are {'optim.q': 2, ...}."""
    cfg = Config()
    cfg.model.name = model
    cfg.data.task = f"jsonl:{data}"
    cfg.data.train_size, cfg.data.dev_size, cfg.data.test_size = 40, 16, 16
    cfg.data.max_length = 16
    cfg.adapter.rank = 4
    cfg.adapter.alpha = 8
    cfg.optim.q, cfg.optim.batch_size, cfg.optim.lr = 2, 2, 1e-2
    cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 6, 3, 2
    cfg.train.eval_batch_size = 8
    cfg.train.out_dir = str(out_dir)
    cfg.train.progress = False
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
