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


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["--optim.lr", "0"], "optim.lr: expected a positive number, got 0.0"),
        (["--optim.lr", "nan"], "optim.lr: expected a finite number"),
        (["--optim.lr", "-inf"], "optim.lr: expected a finite number"),
        (["--optim.momentum", "1.5"], "optim.momentum: expected a number in [0, 1), got 1.5"),
        (["--optim.warmup_steps", "-1"], "optim.warmup_steps: expected a non-negative integer"),
        (["--train.time_limit_s", "-5"], "train.time_limit_s: expected a non-negative number"),
        (["--train.threads", "-2"], "train.threads: expected a positive integer"),
        (["--train.eval_every", "0"], "train.eval_every: expected a positive integer"),
        (["--train.checkpoint_every", "0"], "train.checkpoint_every: expected a positive integer"),
        (["--train.log_every", "0"], "train.log_every: expected a positive integer"),
        (["--federated.fraction", "0"], "federated.fraction: expected a number in (0, 1]"),
        (["--optim.schedule", "step"], "optim.schedule: expected one of"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_override(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value) and f"override {overrides[0]}" in str(e.value)


def test_every_field_declares_what_it_accepts():
    """Numbers name a range or are free (finite only); a choice's help lists its choices."""
    import dataclasses

    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            choices = f.metadata["choices"]
            if choices is not None:
                assert all(c in f.metadata["help"] for c in choices), f.name
            default = getattr(getattr(Config(), section.name), f.name)
            from zotune.config import check_field

            check_field(f.name, default, f.metadata)  # the defaults are accepted


def test_a_programmatic_config_is_checked_too():
    from zotune.config import validate

    cfg = Config()
    cfg.optim.eps = float("inf")
    with pytest.raises(ConfigError, match="optim.eps: expected a finite number"):
        validate(cfg)


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    p = write(tmp_path, "optim:\n  q: 2\n  lr: 0.1\n  q: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}: line 4: key 'q' is given twice (first on line 2)" in str(e.value)
    p = write(tmp_path, "optim:\n  q: 2\ntrain:\n  steps: 3\noptim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="line 5: key 'optim' is given twice"):
        load_config(p)


@pytest.mark.parametrize(
    "data", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", b"optim:\n  q: \xc3\x28\n", b"\x00\x01\x02"]
)
def test_a_binary_file_is_refused(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "line" in str(e.value)
