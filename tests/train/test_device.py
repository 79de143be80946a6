"""zotune export + device-train on a tiny model: the ExecuTorch runtime runs every step."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from zotune.errors import ZotuneError
from zotune.train.device import device_train, export, frozen_path
from zotune.train.run import replay, train

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def program(tmp_path_factory, tiny_folder, cls_jsonl):
    out = tmp_path_factory.mktemp("pte") / "tiny.pte"
    cfg = tiny_config(tiny_folder, cls_jsonl, out.parent / "unused")
    report = export(cfg, str(out))
    assert out.is_file() and frozen_path(out).is_file() and report["check"]["theta"] <= 1e-5
    return str(out)


def final_b(run):
    return {k: v for k, v in load_file(run / "checkpoint" / "state.safetensors").items()}


def test_device_train_matches_eager_and_replays(program, tmp_path, tiny_folder, cls_jsonl):
    dev = tiny_config(tiny_folder, cls_jsonl, tmp_path / "device")
    summary = device_train(program, dev)
    eager = tiny_config(tiny_folder, cls_jsonl, tmp_path / "eager")
    train(eager)
    a, b = final_b(tmp_path / "device"), final_b(tmp_path / "eager")
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for v in a.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    # The device's replay log rebuilds its B in eager PyTorch (RNG bit-exact, arithmetic close).
    out = replay(str(tmp_path / "device" / "replay.jsonl"), str(tmp_path / "replayed"))
    rebuilt = load_file(out / "adapter_model.safetensors")
    for key, value in a.items():
        layer = key[len("param.") : -len(".lora_B")]
        torch.testing.assert_close(
            rebuilt[f"base_model.model.{layer}.lora_B.weight"], value, rtol=1e-4, atol=1e-5
        )
    adapter = load_file(tmp_path / "device" / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_A.weight") for k in adapter)
    assert summary["test"]["accuracy"] >= 0


def test_device_resume_is_exact(program, tmp_path, tiny_folder, cls_jsonl):
    straight = tiny_config(tiny_folder, cls_jsonl, tmp_path / "straight")
    device_train(program, straight)
    split = tiny_config(tiny_folder, cls_jsonl, tmp_path / "split")
    assert device_train(program, split, stop_after=3) is None
    device_train(program, split, resume=True)
    a, b = final_b(tmp_path / "straight"), final_b(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_config_is_refused(program, tmp_path, tiny_folder, cls_jsonl):
    cfg = tiny_config(tiny_folder, cls_jsonl, tmp_path / "x", **{"optim.q": 3})
    with pytest.raises(ZotuneError, match="q"):
        device_train(program, cfg)
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_lora_with_momentum_matches_eager_and_resumes(tmp_path, tiny_folder, cls_jsonl):
    """LoRA (A trained, so theta does not start at zero: device-train seeds it from the export)
    with heavy-ball momentum: the program's momentum buffer follows eager's, a resume restores it
    exactly through the checkpoint, and a config with another momentum is refused."""
    over = {"adapter.kind": "lora", "optim.momentum": 0.9}
    pte = str(tmp_path / "m.pte")
    report = export(tiny_config(tiny_folder, cls_jsonl, tmp_path / "unused", **over), pte)
    assert report["meta"]["methods"][-2:] == ["get_momentum", "set_momentum"]
    assert report["check"]["momentum"] <= 1e-5
    device_train(pte, tiny_config(tiny_folder, cls_jsonl, tmp_path / "device", **over))
    train(tiny_config(tiny_folder, cls_jsonl, tmp_path / "eager", **over))
    a, b = final_b(tmp_path / "device"), final_b(tmp_path / "eager")
    assert a.keys() == b.keys()
    assert any(k.endswith("lora_A") for k in a)
    assert any(k.startswith("momentum.") and v.abs().sum() > 0 for k, v in a.items())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4

    split = tiny_config(tiny_folder, cls_jsonl, tmp_path / "split", **over)
    assert device_train(pte, split, stop_after=3) is None
    device_train(pte, split, resume=True)
    c = final_b(tmp_path / "split")
    assert all(torch.equal(a[k], c[k]) for k in a)

    other = tiny_config(tiny_folder, cls_jsonl, tmp_path / "x", **{**over, "optim.momentum": 0.5})
    with pytest.raises(ZotuneError, match="momentum"):
        device_train(pte, other)
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


# --- the same driver with ONNX Runtime executing the step ---------------------------------------


def _export_onnx_cli(tmp_path, cfg) -> str:
    """`zotune export --engine onnx` from the command line, in-process."""
    from zotune.cli import main

    config = tmp_path / "export.yaml"
    config.write_text(cfg.to_yaml())
    out = tmp_path / "tiny.onnx"
    assert main(["export", "--engine", "onnx", "--config", str(config), "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def onnx_program(tmp_path_factory, tiny_folder, cls_jsonl):
    folder = tmp_path_factory.mktemp("onnx")
    out = _export_onnx_cli(folder, tiny_config(tiny_folder, cls_jsonl, folder / "unused"))
    assert frozen_path(out).is_file() and (folder / "tiny.onnx.eval.onnx").is_file()
    return out


def test_onnx_device_train_matches_eager_and_replays_exactly(onnx_program, tmp_path, tiny_folder, cls_jsonl):
    dev = tiny_config(tiny_folder, cls_jsonl, tmp_path / "device")
    summary = device_train(onnx_program, dev)
    train(tiny_config(tiny_folder, cls_jsonl, tmp_path / "eager"))
    a, b = final_b(tmp_path / "device"), final_b(tmp_path / "eager")
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for v in a.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    # The replay log rebuilds the device's B bit for bit: the RNG is exact and the program's
    # update is the same elementwise arithmetic as eager's.
    out = replay(str(tmp_path / "device" / "replay.jsonl"), str(tmp_path / "replayed"))
    rebuilt = load_file(out / "adapter_model.safetensors")
    for key, value in a.items():
        layer = key[len("param.") : -len(".lora_B")]
        assert torch.equal(rebuilt[f"base_model.model.{layer}.lora_B.weight"], value), key
    adapter = load_file(tmp_path / "device" / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_A.weight") for k in adapter)
    header = (tmp_path / "device" / "replay.jsonl").read_text().splitlines()[0]
    assert '"engine": "onnx"' in header
    assert 0 <= summary["test"]["accuracy"] <= 1


def test_onnx_device_resume_is_exact(onnx_program, tmp_path, tiny_folder, cls_jsonl):
    device_train(onnx_program, tiny_config(tiny_folder, cls_jsonl, tmp_path / "straight"))
    split = tiny_config(tiny_folder, cls_jsonl, tmp_path / "split")
    assert device_train(onnx_program, split, stop_after=3) is None
    device_train(onnx_program, split, resume=True)
    a, b = final_b(tmp_path / "straight"), final_b(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "split" / "metrics.jsonl").read_text().count('"type": "train"') == 6


@pytest.mark.parametrize(
    "override, field",
    [
        ({"optim.q": 3}, "q"),
        ({"optim.batch_size": 4}, "b"),
        ({"data.max_length": 32}, "seq_len"),
        ({"optim.momentum": 0.9}, "momentum"),
        ({"adapter.rank": 8}, "adapter.rank"),
        ({"adapter.kind": "lora"}, "adapter.kind"),
        ({"adapter.targets": ["q_proj"]}, "targets"),
        ({"optim.dual": False}, "dual"),
    ],
)
def test_onnx_program_from_another_config_is_refused(
    onnx_program, tmp_path, tiny_folder, cls_jsonl, override, field
):
    cfg = tiny_config(tiny_folder, cls_jsonl, tmp_path / "x", **override)
    with pytest.raises(ZotuneError, match=field):
        device_train(onnx_program, cfg)
    assert not (tmp_path / "x").exists()


def test_onnx_corrupt_or_truncated_program_exits_2(onnx_program, tmp_path, tiny_folder, cls_jsonl, capsys):
    import shutil

    from zotune.cli import main

    cfg = tiny_config(tiny_folder, cls_jsonl, tmp_path / "run")
    config = tmp_path / "c.yaml"
    config.write_text(cfg.to_yaml())
    for name, damage in (
        ("truncated", lambda d: d[: len(d) // 3]),
        ("corrupt", lambda d: d[:100] + bytes(64) + d[164:]),
    ):
        p = tmp_path / f"{name}.onnx"
        for suffix in ("", ".json", ".eval.onnx", ".frozen.safetensors"):
            shutil.copy(onnx_program + suffix, str(p) + suffix)
        p.write_bytes(damage(p.read_bytes()))
        assert main(["device-train", str(p), "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("zotune: error:") and str(p) in err and len(err.splitlines()) == 1
        assert not (tmp_path / "run").exists()
    assert main(["device-train", str(tmp_path / "none.onnx"), "--config", str(config)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "--engine",
                "onnx",
                "--quantize",
                "8da4w",
                "--config",
                str(config),
                "--out",
                str(tmp_path / "q.onnx"),
            ]
        )
        == 2
    )
    assert "int4" in capsys.readouterr().err and not (tmp_path / "q.onnx").exists()


def test_onnx_lora_with_momentum_matches_eager_and_resumes(tmp_path, tiny_folder, cls_jsonl):
    over = {"adapter.kind": "lora", "optim.momentum": 0.9}
    program = _export_onnx_cli(tmp_path, tiny_config(tiny_folder, cls_jsonl, tmp_path / "u", **over))
    device_train(program, tiny_config(tiny_folder, cls_jsonl, tmp_path / "device", **over))
    train(tiny_config(tiny_folder, cls_jsonl, tmp_path / "eager", **over))
    a, b = final_b(tmp_path / "device"), final_b(tmp_path / "eager")
    assert a.keys() == b.keys() and any(k.endswith("lora_A") for k in a)
    assert any(k.startswith("momentum.") and v.abs().sum() > 0 for k, v in a.items())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    split = tiny_config(tiny_folder, cls_jsonl, tmp_path / "split", **over)
    assert device_train(program, split, stop_after=3) is None
    device_train(program, split, resume=True)
    c = final_b(tmp_path / "split")
    assert all(torch.equal(a[k], c[k]) for k in a)
