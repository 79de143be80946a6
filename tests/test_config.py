import pytest

from zotune.config import Config, load_config
from zotune.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "optim:\n  q: 8\n  lr: 1e-3\ndata:\n  labels: [a, b]\n")
    cfg = load_config(
        p, ["--optim.eps", "0.001", "--train.steps=7", "--optim.dual", "false", "--data.labels", "x,y"]
    )
    assert cfg.optim.q == 8 and cfg.optim.lr == 1e-3 and cfg.optim.eps == 0.001
    assert cfg.train.steps == 7 and cfg.optim.dual is False and cfg.data.labels == ["x", "y"]
    assert cfg.adapter.rank == Config().adapter.rank


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["--optim.q", "3"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    "text,needle",
    [
        ("optim:\n  qq: 1\n", "unknown key 'optim.qq'"),
        ("optimizer:\n  q: 1\n", "unknown section 'optimizer'"),
        ("optim:\n  q: four\n", "optim.q: expected an integer"),
        ("optim:\n  dual: 3\n", "optim.dual: expected true or false"),
        ("optim:\n  estimator: adam\n", "optim.estimator: expected one of"),
        ("optim: [1, 2]\n", "section 'optim' must be a mapping"),
        ("optim:\n  q: [\n", "invalid YAML"),
        ("optim:\n  q: 0\n", "optim.q: expected a positive integer"),
        ("adapter:\n  kind: full\n", "prge needs an adapter"),
    ],
)
def test_bad_yaml_names_the_field(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)
    assert str(p) in str(e.value) or "optim.estimator" in needle or "positive" in needle or "prge" in needle


def test_bad_overrides():
    with pytest.raises(ConfigError, match="override --optim.nope"):
        load_config(None, ["--optim.nope", "1"])
    with pytest.raises(ConfigError, match="missing value"):
        load_config(None, ["--optim.q"])
    with pytest.raises(ConfigError, match="expected --section.key value"):
        load_config(None, ["optim.q", "1"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config(None, ["--q", "1"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_default_targets_are_all_linear(tokenizer):
    """GPT-2-family models train without naming modules, and on Llama-style models all-linear is
    exactly the seven projections of every block, in the same order."""
    from zotune.adapters.lora import find_targets
    from zotune.models.tiny import make_tiny_model

    assert Config().adapter.targets == ["all-linear"]
    gpt2 = find_targets(make_tiny_model("gpt2", tokenizer), Config().adapter.targets)
    assert gpt2 and all(n.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc") for n in gpt2)
    llama = make_tiny_model("llama", tokenizer)
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert find_targets(llama, ["all-linear"]) == find_targets(llama, seven)
