import pytest
import torch

from zotune.data.task import Example
from zotune.data.tokenize import Batch, encode, special_prefix
from zotune.errors import DataError

CHOICES = (" positive", " negative")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_classification_left_padded(tokenizer):
    exs = [
        Example("Review: great film\nSentiment:", CHOICES, 0),
        Example("Review: a very long and rather dull film, really\nSentiment:", CHOICES, 1),
    ]
    b = encode(exs, tokenizer, max_length=32, max_target_length=4, kind="classification")
    assert b.kind == "classification" and len(b) == 2
    assert b.input_ids.shape == b.attention_mask.shape == b.position_ids.shape == (2, 32)
    assert b.input_ids.dtype == b.attention_mask.dtype == b.position_ids.dtype == torch.long
    for i, ex in enumerate(exs):
        p = ids(tokenizer, ex.prompt)
        assert b.input_ids[i, -len(p) :].tolist() == p  # prompt right-aligned: the answer is at T-1
        assert b.attention_mask[i].sum() == len(p)
        assert (b.input_ids[i, : 32 - len(p)] == tokenizer.pad_token_id).all()
        assert b.position_ids[i, -len(p) :].tolist() == list(range(len(p)))
        assert (b.position_ids[i, : 32 - len(p)] == 0).all()
    assert b.choice_ids.tolist() == [[ids(tokenizer, " positive")[0], ids(tokenizer, " negative")[0]]] * 2
    assert b.labels.tolist() == [0, 1]
    assert b.target_ids is None and b.target_mask is None


def test_positions_do_not_depend_on_padding(tokenizer):
    ex = Example("Review: fine\nSentiment:", CHOICES, 0)
    a = encode([ex], tokenizer, 16, 4, "classification")
    b = encode([ex], tokenizer, 40, 4, "classification")
    n = int(a.attention_mask.sum())
    assert a.input_ids[0, -n:].tolist() == b.input_ids[0, -n:].tolist()
    assert a.position_ids[0, -n:].tolist() == b.position_ids[0, -n:].tolist()


def test_classification_truncates_on_the_left(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(100)) + "\nSentiment:"
    b = encode([Example(prompt, CHOICES, 1)], tokenizer, 8, 4, "classification")
    assert b.attention_mask.sum() == 8
    assert b.input_ids[0].tolist() == ids(tokenizer, prompt)[-8:]  # the end of the prompt is kept


def test_multi_token_choice_is_an_error(tokenizer):
    exs = [Example("a", CHOICES, 0), Example("b", (" positive", " ambivalent"), 1)]
    with pytest.raises(DataError, match=r"example 1: choice ' ambivalent' is 2 tokens \[\d+, \d+\]") as e:
        encode(exs, tokenizer, 16, 4, "classification")
    assert e.value.field == "choices"


def test_choice_count_and_label_checks(tokenizer):
    with pytest.raises(DataError, match="example 1 has 3 choices, example 0 has 2"):
        encode(
            [Example("a", CHOICES, 0), Example("b", CHOICES + (" neutral",), 0)],
            tokenizer,
            16,
            4,
            "classification",
        )
    with pytest.raises(DataError, match="example 0: label 2"):
        encode([Example("a", CHOICES, 2)], tokenizer, 16, 4, "classification")
    with pytest.raises(DataError, match="empty prompt"):
        encode([Example("", CHOICES, 0)], tokenizer, 16, 4, "classification")


def test_generation_layout(tokenizer):
    exs = [
        Example("Question: capital of France?\nAnswer:", target=" Paris"),
        Example("Q:", target=" a rather long answer that will be cut off at four tokens"),
    ]
    T, L = 24, 4
    b = encode(exs, tokenizer, T, L, "generation")
    assert b.kind == "generation" and b.choice_ids is None and b.labels is None
    assert b.target_ids.shape == b.target_mask.shape == (2, L)
    assert b.target_mask.dtype == torch.float32
    assert torch.equal(b.target_ids, b.input_ids[:, -L:])
    eos = tokenizer.eos_token_id
    # row 0: completion " Paris" + eos right-aligned, prompt right before it
    comp0 = ids(tokenizer, " Paris") + [eos]
    p0 = ids(tokenizer, exs[0].prompt)
    n0 = len(p0) + len(comp0)
    assert b.input_ids[0, -n0:].tolist() == p0 + comp0
    assert b.target_mask[0].tolist() == [0.0] * (L - len(comp0)) + [1.0] * len(comp0)
    # row 1: completion truncated to L tokens (no eos), mask all ones
    assert b.target_ids[1].tolist() == ids(tokenizer, exs[1].target)[:L]
    assert b.target_mask[1].tolist() == [1.0] * L
    assert b.input_ids[1, -L - len(ids(tokenizer, "Q:")) : -L].tolist() == ids(tokenizer, "Q:")


def test_generation_prompt_truncated_on_the_left(tokenizer):
    prompt = " ".join(f"w{i}" for i in range(200))
    b = encode([Example(prompt, target=" end")], tokenizer, 12, 4, "generation")
    comp = ids(tokenizer, " end") + [tokenizer.eos_token_id]
    assert b.attention_mask.sum() == 12
    assert b.input_ids[0].tolist() == ids(tokenizer, prompt)[-(12 - len(comp)) :] + comp


def test_generation_empty_prompt_masks_first_token(tokenizer):
    # {"text"} records: prompt "", no BOS in SmolLM2 -> the first token has nothing to be predicted from
    b = encode([Example("", target=" hello world")], tokenizer, 8, 4, "generation")
    comp = ids(tokenizer, " hello world") + [tokenizer.eos_token_id]
    assert b.target_ids[0, -len(comp) :].tolist() == comp
    assert b.target_mask[0].tolist() == [0.0] * (4 - len(comp)) + [0.0] + [1.0] * (len(comp) - 1)


def test_generation_length_checks(tokenizer):
    with pytest.raises(DataError, match="max_target_length 8") as e:
        encode([Example("a", target=" b")], tokenizer, 8, 8, "generation")
    assert e.value.field == "data.max_target_length"
    with pytest.raises(DataError, match="example 0 has no target"):
        encode([Example("a", CHOICES, 0)], tokenizer, 8, 4, "generation")
    with pytest.raises(DataError, match="unknown kind"):
        encode([Example("a", CHOICES, 0)], tokenizer, 8, 4, "regression")
    with pytest.raises(DataError, match="no examples"):
        encode([], tokenizer, 8, 4, "generation")


def test_batch_slice_index_repeat(tokenizer):
    exs = [Example(f"text number {i}", CHOICES, i % 2) for i in range(3)]
    b = encode(exs, tokenizer, 10, 4, "classification")
    s = b.slice(1, 3)
    assert len(s) == 2 and torch.equal(s.input_ids, b.input_ids[1:3]) and s.labels.tolist() == [1, 0]
    one = b.index(2)
    assert len(one) == 1 and torch.equal(one.input_ids, b.input_ids[2:3])
    picked = b.index(torch.tensor([2, 0]))
    assert picked.labels.tolist() == [0, 0] and torch.equal(picked.choice_ids, b.choice_ids[[2, 0]])
    r = b.repeat(4)
    assert len(r) == 12
    for k in range(4):
        for i in range(3):  # row k*B + i is row i
            assert torch.equal(r.input_ids[k * 3 + i], b.input_ids[i])
            assert r.labels[k * 3 + i] == b.labels[i]
    g = encode([Example("a", target=" b")], tokenizer, 8, 4, "generation").repeat(2)
    assert g.target_mask.shape == (2, 4) and g.choice_ids is None


class CharTokenizer:
    """One token per character, BOS=1, EOS=2, no pad token: checks the BOS and pad handling."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    def __call__(self, text, add_special_tokens=True):
        def enc(t):
            return ([1] if add_special_tokens else []) + [ord(c) for c in t]

        return {"input_ids": [enc(t) for t in text] if isinstance(text, list) else enc(text)}


def test_bos_is_kept_when_truncating():
    tok = CharTokenizer()
    assert special_prefix(tok) == [1]
    b = encode([Example("abcdefgh", ("x", "y"), 0)], tok, 5, 2, "classification")
    assert b.input_ids[0].tolist() == [1, ord("e"), ord("f"), ord("g"), ord("h")]
    g = encode([Example("abcdefgh", target="xy"), Example("", target="z")], tok, 6, 3, "generation")
    assert g.input_ids[0].tolist() == [1, ord("g"), ord("h"), ord("x"), ord("y"), 2]
    # empty prompt: the BOS precedes the completion, so its first token is trained; pad falls back to eos
    assert g.input_ids[1].tolist() == [2, 2, 2, 1, ord("z"), 2]
    assert g.target_mask[1].tolist() == [0.0, 1.0, 1.0]
    assert g.attention_mask[1].tolist() == [0, 0, 0, 1, 1, 1]


def test_batch_is_a_dataclass_of_tensors():
    t = torch.zeros(2, 3, dtype=torch.long)
    b = Batch(t, t, t)
    assert len(b) == 2 and b.kind == "generation" and b.to("cpu").input_ids.shape == (2, 3)
