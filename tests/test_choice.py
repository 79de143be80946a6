"""Multiple choice with multi-token answers: encoding, the loss against a direct per-choice
computation, P-RGE == sequential RGE for it, and a training run from a JSONL file."""

import json

import pytest
import torch

from helpers import randomize
from zotune.adapters.lora import LoRAAdapter
from zotune.cli import main
from zotune.config import DataConfig
from zotune.data import load_task
from zotune.data.choice import resolve_kind
from zotune.data.task import Example
from zotune.data.tokenize import encode, special_prefix
from zotune.errors import DataError
from zotune.estimators.prge import PRGEStep
from zotune.estimators.rge import RGE
from zotune.loss import batch_tensors, make_loss
from zotune.models.tiny import make_tiny_model

EXAMPLES = [
    Example(
        "The man broke his toe because", (" he dropped a hammer on his foot", " he got a hole in his sock"), 0
    ),
    Example("Q: the capital of France?\nA:", (" Paris", " Lyon in the south", " a small town"), 2),
    Example("It rained so", (" the ground was wet", " we sang"), 1),
]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def direct_scores(model, tokenizer, ex, normalize=False):
    """Each choice on its own, unpadded: sum (or mean) of log p(choice token | everything before)."""
    out = []
    for choice in ex.choices:
        p, c = special_prefix(tokenizer) + ids(tokenizer, ex.prompt), ids(tokenizer, choice)
        x = torch.tensor([p + c])
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)  # [n, V]
        s = sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c))
        out.append(float(s / len(c) if normalize else s))
    return out


def test_layout(tokenizer):
    T, L = 32, 8
    b = encode(EXAMPLES, tokenizer, T, L, "choice")
    assert b.kind == "choice" and len(b) == 3
    assert b.input_ids.shape == b.attention_mask.shape == (3, 3, T) and b.target_mask.shape == (3, 3, L)
    assert b.labels.tolist() == [0, 2, 1]
    assert torch.equal(b.target_ids, b.input_ids[..., -L:])
    # example 0 has 2 choices: its third row is a masked copy of its first
    assert b.target_mask[0, 2].sum() == 0 and torch.equal(b.input_ids[0, 2], b.input_ids[0, 0])
    n = len(ids(tokenizer, " Lyon in the south"))
    assert b.target_mask[1, 1].tolist() == [0.0] * (L - n) + [1.0] * n
    assert b.input_ids[1, 1, -n:].tolist() == ids(tokenizer, " Lyon in the south")
    nb = encode(EXAMPLES, tokenizer, T, L, "choice", length_normalize=True)
    assert torch.allclose(nb.target_mask[1, 1].sum(), torch.tensor(1.0))
    # the example axis selects, slices and tiles like every other batch
    assert nb.index([2, 0]).labels.tolist() == [1, 0] and nb.repeat(2).input_ids.shape == (6, 3, T)


def test_resolve_kind(tokenizer):
    one_token = [Example("a", (" positive", " negative"), 0)]
    assert resolve_kind("classification", one_token, tokenizer) == "classification"
    assert resolve_kind("classification", EXAMPLES[:1], tokenizer) == "choice"
    uneven = [Example("a", (" yes", " no"), 0), Example("b", (" yes", " no", " maybe"), 2)]
    assert resolve_kind("classification", uneven, tokenizer) == "choice"
    assert resolve_kind("generation", EXAMPLES, tokenizer) == "generation"


@pytest.mark.parametrize("normalize", [False, True])
def test_scores_equal_a_direct_per_choice_computation(family, tokenizer, normalize):
    model = make_tiny_model(family, tokenizer, dtype=torch.float64)
    b = encode(EXAMPLES, tokenizer, 40, 10, "choice", length_normalize=normalize)
    loss = make_loss("choice")
    with torch.no_grad():
        scores = loss.scores(model, *batch_tensors(b, "choice")[:5])  # [3, 3]
        for i, ex in enumerate(EXAMPLES):
            want = direct_scores(model, tokenizer, ex, normalize)
            torch.testing.assert_close(
                scores[i, : len(want)], torch.tensor(want, dtype=scores.dtype), rtol=1e-6, atol=1e-6
            )
        assert scores[0, 2] == float("-inf") and scores[2, 2] == float("-inf")
        nll, count = loss.rows(model, *batch_tensors(b, "choice"))
        want_nll = -torch.log_softmax(scores, -1).gather(1, b.labels[:, None]).squeeze(1)
        torch.testing.assert_close(nll, want_nll)
        assert count.tolist() == [1.0, 1.0, 1.0]


def test_one_token_choices_match_classification(tokenizer):
    """With one-token choices the choice loss is the classification loss."""
    model = make_tiny_model("llama", tokenizer, dtype=torch.float64)
    exs = [
        Example("Review: fine\nSentiment:", (" positive", " negative"), 0),
        Example("Review: awful stuff\nSentiment:", (" positive", " negative"), 1),
    ]
    with torch.no_grad():
        a = make_loss("choice").rows(model, *batch_tensors(encode(exs, tokenizer, 16, 4, "choice"), "choice"))
        c = make_loss("classification").rows(
            model, *batch_tensors(encode(exs, tokenizer, 16, 4, "classification"), "classification")
        )
    torch.testing.assert_close(a[0], c[0])


def test_prge_equals_sequential_rge(tokenizer):
    model = make_tiny_model("qwen2", tokenizer, dtype=torch.float64)
    adapter = LoRAAdapter(model, rank=4, alpha=8, train_a=True)  # LoRA: both A and B perturbed
    randomize(adapter.tensors())
    start = adapter.state()
    batch = batch_tensors(encode(EXAMPLES, tokenizer, 32, 8, "choice"), "choice")
    loss, seed = make_loss("choice"), 77
    _, g_rge = RGE(model, adapter, loss, q=3).step(batch, seed, 1e-2, 1e-2)
    state_rge = adapter.state()
    for dual in (True, False):
        adapter.load_state(start)
        _, g = PRGEStep(model, adapter, loss, q=3, dual=dual)(torch.tensor([seed]), 1e-2, 1e-2, *batch)
        assert g_rge.abs().min() > 0
        torch.testing.assert_close(g, g_rge, rtol=1e-9, atol=1e-12)
        for k, v in adapter.state().items():
            torch.testing.assert_close(v, state_rge[k], rtol=1e-9, atol=1e-12)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def choice_rows(n):
    colours = [" red", " green", " deep blue", " pale yellow"]
    return [
        {"prompt": f"Item {i} has the colour", "choices": colours[: 2 + i % 3], "answer": i % 2}
        for i in range(n)
    ]


def test_jsonl_choice_file(tmp_path, tokenizer):
    f = write(tmp_path / "mc.jsonl", choice_rows(30))
    s = load_task(
        DataConfig(task=f"jsonl:{f}", train_size=10, dev_size=5, test_size=5, template="Q: {input}\nA:")
    )
    assert s.kind == "choice" and s.sizes() == {"train": 10, "dev": 5, "test": 5}
    ex = s.train[0]
    assert ex.prompt.startswith("Q: Item ") and ex.choices[:2] == (" red", " green")
    assert ex.origin[0] == str(f)


@pytest.mark.parametrize(
    "record,field",
    [
        ({"prompt": "p", "choices": [], "answer": 0}, "choices"),
        ({"prompt": "p", "choices": [" only"], "answer": 0}, "choices"),
        ({"prompt": "p", "choices": [" a", " b"], "answer": 2}, "answer"),
        ({"prompt": "p", "choices": [" a", ""], "answer": 0}, "choices[1]"),
        ({"prompt": "p", "choices": [" a", " b"], "answer": True}, "answer"),
    ],
)
def test_bad_choice_records_name_file_line_field(tmp_path, record, field):
    f = write(tmp_path / "bad.jsonl", choice_rows(3) + [record])
    with pytest.raises(DataError) as e:
        load_task(DataConfig(task=f"jsonl:{f}"))
    assert (e.value.file, e.value.line, e.value.field) == (str(f), 4, field)


def test_choice_longer_than_max_target_length(tmp_path, tokenizer):
    rows = choice_rows(6)
    rows[4] = {
        "prompt": "p",
        "choices": [" a", " a very long choice with many many words in it"],
        "answer": 0,
    }
    f = write(tmp_path / "long.jsonl", rows)
    s = load_task(DataConfig(task=f"jsonl:{f}", train_size=2, dev_size=2, test_size=2))
    with pytest.raises(DataError, match="more than data.max_target_length=4") as e:
        encode(s.train + s.dev + s.test, tokenizer, 16, 4, "choice")
    assert (e.value.line, e.value.field) == (5, "choices[1]")


def test_train_and_bad_input_from_the_command_line(tmp_path, tiny_folder, capsys):
    f = write(tmp_path / "mc.jsonl", choice_rows(40))
    args = [
        "--model.name",
        tiny_folder,
        "--data.task",
        f"jsonl:{f}",
        "--data.train_size",
        "20",
        "--data.dev_size",
        "8",
        "--data.test_size",
        "8",
        "--data.max_length",
        "16",
        "--data.max_target_length",
        "4",
        "--adapter.rank",
        "2",
        "--optim.q",
        "2",
        "--optim.batch_size",
        "2",
        "--train.steps",
        "3",
        "--train.eval_every",
        "3",
        "--train.progress",
        "false",
    ]
    assert main(["train", *args, "--train.out_dir", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= summary["test"]["accuracy"] <= 1 and summary["zero_shot"]["dev"]["loss"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    bad = write(tmp_path / "bad.jsonl", choice_rows(39) + [{"prompt": "p", "choices": [" a"], "answer": 0}])
    out = tmp_path / "bad-run"
    assert main(["train", *args, "--data.task", f"jsonl:{bad}", "--train.out_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl, line 40, field 'choices'" in err[0]
    assert not out.exists()
