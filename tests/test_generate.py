"""Generation judged by generation: the metrics, greedy decoding with the KV cache against a plain
greedy loop, and a training run whose dev selection uses the generation score."""

import json

import pytest
import torch

from helpers import randomize
from zotune.adapters.lora import LoRAAdapter
from zotune.cli import main
from zotune.config import DataConfig
from zotune.data import load_task
from zotune.errors import DataError
from zotune.eval_generate import exact_match, generate, normalize_answer, rouge_l, score_generations, token_f1
from zotune.models.tiny import make_tiny_model


def test_squad_normalisation_and_metrics():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    # pred "eiffel" vs ref "eiffel tower": precision 1, recall 1/2 -> F1 2/3
    assert token_f1("Eiffel", "the Eiffel Tower") == pytest.approx(2 / 3)
    assert token_f1("Paris", "London") == 0.0
    # LCS("y b c d e", "y c e f") = "y c e": P 3/5, R 3/4 -> F = 2PR/(P+R)
    assert rouge_l("y b c d e", "y c e f") == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert rouge_l("paris", "paris") == 1.0 and rouge_l("", "paris") == 0.0
    s = score_generations(["Paris\nQuestion: next", "Lyon"], ["Paris", "Marseille"])
    assert s == {"exact_match": 0.5, "f1": 0.5, "rougeL": 0.5}  # cut at the line break


def greedy_loop(model, ids, n, eos):
    """No cache, no padding: one full forward per new token."""
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_kv_cache_generation_equals_a_plain_greedy_loop(tokenizer):
    model = make_tiny_model("llama", tokenizer, dtype=torch.float64)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    randomize(adapter.tensors(), std=0.5)  # the adapter changes what is generated
    prompts = ["Question: what is the capital of France?\nAnswer:", "Hi", "one two three four five six"]
    texts = generate(model, tokenizer, prompts, max_length=64, max_new_tokens=6, batch_size=2, progress=False)
    for prompt, text in zip(prompts, texts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        want = greedy_loop(model, ids, 6, tokenizer.eos_token_id)
        assert text == tokenizer.decode(want, skip_special_tokens=True)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_B.zero_()
    assert generate(model, tokenizer, prompts, 64, 6, 2, progress=False) != texts


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n):
    return [{"prompt": f"Q: what comes after {i}?\nA:", "completion": f" {i + 1}"} for i in range(n)]


def test_generation_run_selects_on_the_generation_score(tmp_path, tiny_folder, capsys):
    f = write(tmp_path / "qa.jsonl", qa_rows(40))
    args = [
        "--model.name",
        tiny_folder,
        "--data.task",
        f"jsonl:{f}",
        "--data.train_size",
        "20",
        "--data.dev_size",
        "6",
        "--data.test_size",
        "6",
        "--data.max_length",
        "24",
        "--data.max_target_length",
        "4",
        "--adapter.rank",
        "2",
        "--optim.q",
        "2",
        "--optim.batch_size",
        "2",
        "--train.steps",
        "2",
        "--train.eval_every",
        "1",
        "--train.progress",
        "false",
    ]
    out = tmp_path / "run"
    assert main(["train", *args, "--train.out_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for split in (summary["test"], summary["zero_shot"]["dev"]):
        assert {"exact_match", "f1", "rougeL", "score", "loss"} <= set(split)
        assert split["score"] == split["f1"] and 0 <= split["f1"] <= 1
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    dev = [e for e in evals if e["type"] == "eval" and e["split"] == "dev"]
    best = max(dev, key=lambda e: e["score"])  # first of the best (ties keep the earlier one)
    assert summary["selected_step"] == best["done"]
    assert "test score" in capsys.readouterr().out
    # bad input: a completion longer than max_target_length, naming file and line; nothing written
    rows = qa_rows(40)
    rows[7]["completion"] = " a completion that is much longer than four tokens"
    bad = write(tmp_path / "bad.jsonl", rows)
    out2 = tmp_path / "bad-run"
    capsys.readouterr()
    assert main(["train", *args, "--data.task", f"jsonl:{bad}", "--train.out_dir", str(out2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl, line 8, field 'completion'" in err[0]
    assert "max_target_length=4" in err[0] and not out2.exists()


def test_mezo_squad_and_drop(tmp_path):
    squad = [
        {
            "title": "T",
            "context": f"Context {i}.",
            "question": f"Question {i}? ",
            "answers": {"text": [f"answer {i}", "other"], "answer_start": [0, 3]},
        }
        for i in range(12)
    ]
    drop = [
        {
            "passage": f"Passage {i}.",
            "question": f"How many {i}?",
            "answers_spans": {"spans": [str(i)], "types": ["number"]},
        }
        for i in range(12)
    ]
    for name, rows in (("squad", squad), ("drop", drop)):
        folder = tmp_path / name
        folder.mkdir()
        write(folder / "train.jsonl", rows[:8])
        write(folder / "validation.jsonl", rows[8:])
        s = load_task(DataConfig(task=f"mezo:{name}:{folder}", train_size=6, dev_size=2, test_size=4))
        assert s.kind == "generation" and s.sizes() == {"train": 6, "dev": 2, "test": 4}
        ex = s.test[0]
        i = int(ex.target.split()[-1])
        if name == "squad":
            assert ex.prompt == f"Title: T\nContext: Context {i}.\nQuestion: Question {i}?\nAnswer:"
            assert ex.target == f" answer {i}"
        else:
            assert ex.prompt == f"Passage: Passage {i}.\nQuestion: How many {i}?\nAnswer:"
    write(tmp_path / "squad" / "train.jsonl", squad[:7] + [{**squad[7], "answers": {"text": []}}])
    with pytest.raises(DataError) as e:
        load_task(DataConfig(task=f"mezo:squad:{tmp_path / 'squad'}"))
    assert (e.value.line, e.value.field) == (8, "answers")
