import pytest
import torch

from zotune.models.loader import load_tokenizer
from zotune.models.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (real vocabulary, left padding)."""
    return load_tokenizer("smollm2-135m")


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def tiny_model(request, tokenizer):
    return make_tiny_model(request.param, tokenizer, seed=0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
