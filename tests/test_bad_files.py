"""Undecodable, corrupted, truncated or wrongly typed files, through the command line on the tiny
model: exit status 2, one `zotune: error:` line naming the file, no traceback, no partial output."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from conftest import tiny_config
from zotune.cli import main
from zotune.engines.eager import build_params
from zotune.engines.export_common import FORMAT_VERSION, sha256_bytes
from zotune.models import load_model, resolve
from zotune.models.loader import _embedded_gguf
from zotune.train.device import _frozen_digest, frozen_path
from zotune.train.run import replay_header

pytestmark = pytest.mark.filterwarnings("ignore")


def one_error(capsys, *names: str) -> str:
    """The single stderr line of a failed command; it names every one of `names`."""
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zotune: error: "), out.err
    assert "Traceback" not in out.err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def config(tmp_path, tiny_folder, cls_jsonl):
    """config(**overrides) -> (YAML file of a tiny run, its run folder)."""

    def make(**overrides):
        run = tmp_path / "run"
        path = tmp_path / "config.yaml"
        path.write_text(tiny_config(tiny_folder, cls_jsonl, run, **overrides).to_yaml())
        return str(path), run

    return make


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_jsonl_with_bytes_that_are_not_utf8(tmp_path, config, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(
        '{"input": "good", "label": "positive"}\n{"input": "caf\xe9", "label": "x"}\n'.encode("latin-1")
    )
    path, run = config(**{"data.task": f"jsonl:{bad}"})
    assert main(["train", "--config", path]) == 2
    assert "line 2: not UTF-8 text" in one_error(capsys, str(bad))
    assert not run.exists()


def test_replay_log_of_random_bytes_or_a_wrongly_typed_header(tmp_path, config, capsys):
    path, run = config(**{"train.steps": 2, "train.eval_every": 2})
    assert main(["train", "--config", path]) == 0
    capsys.readouterr()
    lines = (run / "replay.jsonl").read_text().splitlines()
    cases = {
        "random.jsonl": os.urandom(64) + b"\xff",
        "header.jsonl": "\n".join([json.dumps({**json.loads(lines[0]), "noise": 3}), *lines[1:]]).encode(),
        "layout.jsonl": "\n".join([json.dumps({**json.loads(lines[0]), "layout": [1]}), *lines[1:]]).encode(),
        "steps.jsonl": "\n".join([lines[0], json.dumps({**json.loads(lines[1]), "g": "1.0"})]).encode(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"{name}.out"
        assert main(["replay", str(tmp_path / name), "--out", str(out)]) == 2
        one_error(capsys, str(tmp_path / name))
        assert not out.exists()


def test_corrupted_checkpoint_refuses_to_resume(config, capsys):
    path, run = config()
    assert main(["train", "--config", path, "--stop-after", "2"]) == 0
    capsys.readouterr()
    logs = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "replay.jsonl")}
    state, meta = run / "checkpoint" / "state.safetensors", run / "checkpoint" / "meta.json"
    good = state.read_bytes(), meta.read_bytes()
    for target, offset, message in (
        (state, len(good[0]) - 5, "do not match the sha256"),  # a tensor value: caught by the digest
        (state, 12, "not a valid safetensors file"),  # the header
        (meta, 3, "meta.json"),
    ):
        flip(target, offset)
        assert main(["train", "--config", path, "--resume"]) == 2
        assert message in one_error(capsys, str(run / "checkpoint"))
        assert {name: (run / name).read_bytes() for name in logs} == logs
        state.write_bytes(good[0])
        meta.write_bytes(good[1])
    assert main(["train", "--config", path, "--resume"]) == 0  # the intact checkpoint resumes


def test_truncated_or_corrupted_model_weights(tmp_path, tiny_folder, config, capsys):
    for name, damage in (
        ("truncated", lambda d: d[: len(d) // 2]),
        ("corrupted", lambda d: d[:20] + b"x" * 20 + d[40:]),
    ):
        folder = tmp_path / name
        shutil.copytree(tiny_folder, folder)
        weights = folder / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        path, run = config(**{"model.name": str(folder)})
        assert main(["train", "--config", path]) == 2
        assert "not a valid safetensors file" in one_error(capsys, str(weights))
        assert not run.exists()


def test_truncated_gguf(tmp_path, config, capsys, monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "cut.gguf"
    with open(_embedded_gguf("smollm2-135m"), "rb") as f:
        gguf.write_bytes(f.read(1 << 21))
    path, run = config(**{"model.name": str(gguf)})
    assert main(["train", "--config", path]) == 2
    assert "expected a GGUF file" in one_error(capsys, str(gguf))
    assert not run.exists() and not list((tmp_path / "cache" / "models").iterdir())


# -- exported programs: files that stand in for a .pte / .onnx, with consistent sidecars ---------


@pytest.fixture
def program(tmp_path, tiny_folder, cls_jsonl):
    """program(engine) -> (program path, sidecar dict): a program file of random bytes with a
    well-formed sidecar and frozen-tensor file for the tiny config (what the host reads before
    the runtime sees the program)."""
    cfg = tiny_config(tiny_folder, cls_jsonl, tmp_path / "unused")
    model, _, _ = load_model(tiny_folder)
    adapter = build_params(model, cfg)
    header = json.dumps(replay_header(cfg, adapter))
    frozen = {"x": torch.arange(6.0)}

    def make(engine: str, suffix: str):
        path = tmp_path / f"step{suffix}"
        # An ExecuTorch program starts with a flatbuffer size and the identifier ET12.
        path.write_bytes((b"\x3c\x00\x00\x00ET12" if engine == "executorch" else b"") + os.urandom(248))
        o = cfg.optim
        meta = {
            "format": FORMAT_VERSION,
            "engine": engine,
            **{"q": o.q, "b": o.batch_size, "seq_len": cfg.data.max_length, "n_choices": 2, "n_target": 0},
            "loss": "classification",
            **{"eval_batch": cfg.train.eval_batch_size, "numel": adapter.layout.numel},
            **{"noise": o.noise, "dual": o.dual, "momentum": o.momentum, "model": cfg.model.name},
            "layout": adapter.layout.to_json(),
            "size": path.stat().st_size,
            "sha256": sha256_bytes(path.read_bytes()),
        }
        if engine == "onnx":
            ev = Path(str(path) + ".eval.onnx")
            ev.write_bytes(os.urandom(128))
            meta["graphs"] = {"forward": {"size": 128, "sha256": sha256_bytes(ev.read_bytes())}}
        Path(str(path) + ".json").write_text(json.dumps(meta))
        metadata = {"replay_header": header, "sha256": _frozen_digest(frozen, header)}
        frozen_path(path).write_bytes(save(frozen, metadata=metadata))
        return path, meta

    return make


@pytest.mark.parametrize("engine, suffix", [("executorch", ".pte"), ("onnx", ".onnx")])
def test_program_files(engine, suffix, program, config, capsys):
    path, run = config()
    pte, meta = program(engine, suffix)
    side, frozen = Path(str(pte) + ".json"), frozen_path(pte)
    # The program itself: random bytes whose size and sha256 the sidecar vouches for.
    assert main(["device-train", str(pte), "--config", path]) == 2
    assert "cannot load this program" in one_error(capsys, str(pte))
    if engine == "executorch":  # without the identifier the runtime is not asked
        pte.write_bytes(os.urandom(256))
        side.write_text(json.dumps({**meta, "size": 256, "sha256": sha256_bytes(pte.read_bytes())}))
        assert main(["device-train", str(pte), "--config", path]) == 2
        assert "not an ExecuTorch program" in one_error(capsys, str(pte))
    # A sidecar field of the wrong type.
    side.write_text(json.dumps({**meta, "n_choices": "2"}))
    assert main(["device-train", str(pte), "--config", path]) == 2
    assert "field 'n_choices'" in one_error(capsys, str(side))
    side.write_bytes(b"\xff" + json.dumps(meta).encode())
    assert main(["device-train", str(pte), "--config", path]) == 2
    assert "not UTF-8" in one_error(capsys, str(side))
    side.write_text(json.dumps(meta))
    # The frozen tensors: a flipped value (caught by their digest), a flipped header, a truncation.
    good = frozen.read_bytes()
    for damaged, message in (
        (good[:-4] + bytes([good[-4] ^ 1]) + good[-3:], "do not match the sha256"),
        (good[:10] + b"\x00" + good[11:], "not a valid safetensors file"),
        (good[: len(good) // 2], "not a valid safetensors file"),
    ):
        frozen.write_bytes(damaged)
        assert main(["device-train", str(pte), "--config", path]) == 2
        assert message in one_error(capsys, str(frozen))
    assert not run.exists()


# -- a model cache owned by another user ---------------------------------------------------------


def _without_file_override():
    """preexec_fn: as root, give up the capabilities that let root ignore file permissions, so
    that chmod makes a folder read-only for the child as it is for any other user."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            assert libc.prctl(24, cap, 0, 0, 0) == 0  # PR_CAPBSET_DROP: gone after exec
    return None


def _zotune_read_only(cache: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ZOTUNE_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "zotune.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_without_file_override,
    )


def test_read_only_model_cache(tmp_path):
    converted = Path(resolve("smollm2-135m").path)  # the shared cache holds the converted model
    empty, filled = tmp_path / "empty", tmp_path / "filled"
    empty.mkdir()
    (filled / "models").mkdir(parents=True)
    (filled / "models" / converted.name).symlink_to(converted)
    read_only = stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for folder in (empty, filled / "models", filled):
        folder.chmod(read_only)
    try:
        # Nothing converted yet: the conversion needs the cache, and says it cannot write there.
        proc = _zotune_read_only(empty, "models", "smollm2-135m")
        assert proc.returncode == 2 and not proc.stdout, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("zotune: error: "), proc.stderr
        assert f"{empty / 'models'} is not writable" in lines[0] and "ZOTUNE_CACHE" in lines[0]
        assert not list(empty.iterdir())
        # Already converted: read without writing.
        proc = _zotune_read_only(filled, "models", "smollm2-135m")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["layers"] == 30
        assert os.listdir(filled) == ["models"] and os.listdir(filled / "models") == [converted.name]
    finally:
        for folder in (empty, filled / "models", filled):
            folder.chmod(stat.S_IRWXU)
