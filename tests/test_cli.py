import json
import subprocess
import sys

from zotune.cli import main


def test_models_lists_the_embedded_model(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def test_data_shows_sizes(capsys, cls_jsonl):
    args = [
        "data",
        "--data.task",
        f"jsonl:{cls_jsonl}",
        "--data.train_size",
        "40",
        "--data.dev_size",
        "10",
        "--data.test_size",
        "10",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    sizes = json.loads(out[: out.index("}") + 1])
    assert sizes["kind"] == "classification" and sizes["train"] == 40 and sizes["test"] == 10


def test_bad_input_exits_2_with_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "label": "x"}\n{"input": \n')
    assert main(["data", "--data.task", f"jsonl:{bad}"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 2" in err
    assert main(["train", "--optim.q", "many"]) == 2
    assert "optim.q: expected an integer" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_train_eval_replay_from_the_command_line(tmp_path, tiny_folder, cls_jsonl):
    common = [
        "--model.name",
        tiny_folder,
        "--data.task",
        f"jsonl:{cls_jsonl}",
        "--data.train_size",
        "40",
        "--data.dev_size",
        "16",
        "--data.test_size",
        "16",
        "--data.max_length",
        "16",
        "--adapter.rank",
        "4",
        "--train.threads",
        "1",
        "--train.eval_batch_size",
        "16",
    ]
    run = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "zotune.cli",
            "train",
            *common,
            "--optim.q",
            "2",
            "--optim.batch_size",
            "2",
            "--train.steps",
            "4",
            "--train.eval_every",
            "2",
            "--train.progress",
            "false",
            "--train.out_dir",
            str(run),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "zero-shot test accuracy" in out.stdout and "adapter:" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    ev = subprocess.run(
        [sys.executable, "-m", "zotune.cli", "eval", *common, "--adapter", str(run / "adapter")],
        capture_output=True,
        text=True,
    )
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == summary["test"]["accuracy"]
    rp = subprocess.run(
        [
            sys.executable,
            "-m",
            "zotune.cli",
            "replay",
            str(run / "replay.jsonl"),
            "--out",
            str(tmp_path / "replayed"),
        ],
        capture_output=True,
        text=True,
    )
    assert rp.returncode == 0, rp.stderr
    assert (tmp_path / "replayed" / "adapter_model.safetensors").is_file()


def test_train_help_lists_every_config_field_with_its_help(capsys):
    import dataclasses

    import pytest

    from zotune.config import Config

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            assert f"--{section.name}.{f.name} " in out
            assert f.metadata["help"] and f.metadata["help"] in out
