"""Distributed training: real torchrun jobs of 2 processes (gloo over 127.0.0.1), compared with
a run on one process of the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import free_port
from zotune.config import load_config
from zotune.train.logs import TIMING_FIELDS
from zotune.train.run import replay, train

pytestmark = pytest.mark.filterwarnings("ignore")

TIMEOUT = 180  # seconds for any one job: a hang fails the test instead of stalling the suite
STEPS = 20  # of the query-parallel runs
WORKER = Path(__file__).with_name("nan_step_worker.py")


def launcher(nproc: int = 2, port: int | None = None, extra=()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port or free_port()),
        *extra,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        launcher(**kw) + ["-m", "zotune.cli", "train", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def cli_args(tiny_folder, cls_jsonl, out: Path, **overrides) -> list[str]:
    values = {
        "model.name": tiny_folder,
        "data.task": f"jsonl:{cls_jsonl}",
        "data.train_size": 40,
        "data.dev_size": 16,
        "data.test_size": 16,
        "data.max_length": 16,
        "adapter.rank": 4,
        "adapter.alpha": 8,
        "optim.q": 4,
        "optim.batch_size": 2,
        "optim.lr": 0.01,
        "optim.momentum": 0.5,
        # The step scale: lr of each step from the g of the steps before it, on every rank.
        "optim.normalize": "rms",
        "train.steps": STEPS,
        "train.eval_every": 10,
        "train.checkpoint_every": 1,
        "train.eval_batch_size": 6,
        "train.progress": "false",
        "train.threads": 1,
        "train.out_dir": str(out),
        **overrides,
    }
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def single_run(args: list[str], resume: bool = False) -> None:
    """The same config on this one process."""
    train(load_config(None, args), resume=resume)


def records(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
        for line in path.read_text().splitlines()
    ]


def state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoint" / "state.safetensors")


def replay_g(run: Path) -> torch.Tensor:
    return torch.tensor(
        [r["g"] for r in records(run / "replay.jsonl") if r["type"] == "step"], dtype=torch.float64
    )  # [steps, q]


@pytest.fixture(scope="module")
def query_reference(tmp_path_factory, tiny_folder, cls_jsonl):
    """A one-process run of the config the query-parallel jobs split."""
    out = tmp_path_factory.mktemp("single") / "run"
    single_run(cli_args(tiny_folder, cls_jsonl, out))
    return out


@pytest.fixture(scope="module")
def gen_jsonl(tmp_path_factory):
    """Completions of 1 to 4 words: the ranks' halves of a batch hold different token counts."""
    words = ["good", "bad", "fine", "poor", "great", "awful"]
    rows = [{"prompt": f"item {i} was", "completion": " " + " ".join(words[: 1 + i % 4])} for i in range(60)]
    path = tmp_path_factory.mktemp("gen") / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_data_parallel_matches_the_single_process_run(tmp_path, tiny_folder, gen_jsonl):
    """Each rank scores half of the batch; summed loss sums and token counts give the global
    token-level mean up to float summation order (fp64 here, so that order is all that differs).
    A generation task, so the halves' token counts differ. The job stops after 3 steps and one
    process resumes it: the checkpoint, step scale included, does not depend on the ranks."""
    over = {
        "data.task": f"jsonl:{gen_jsonl}",
        "data.max_target_length": 6,
        "model.dtype": "float64",
        "optim.batch_size": 4,
        "optim.q": 2,
        "train.steps": 6,
        "train.eval_every": 3,
    }
    single = tmp_path / "single"
    single_run(cli_args(tiny_folder, gen_jsonl, single, **over))
    run = tmp_path / "data"
    args = cli_args(tiny_folder, gen_jsonl, run, **over, **{"train.parallel": "data"})
    job = torchrun([*args, "--stop-after", "3"])
    assert job.returncode == 0, job.stderr[-3000:]
    report = json.loads((run / "distributed.json").read_text())
    assert report["traffic"]["step"]["bytes"] == 3 * (4 * 2 + 2) * 8  # sums, counts, flags
    assert json.loads((run / "checkpoint/meta.json").read_text())["scale"]["seen"] == 3
    single_run(args, resume=True)
    g, g_ref = replay_g(run), replay_g(single)
    assert g.shape == (6, 2) and g_ref.abs().min() > 0
    assert ((g - g_ref).abs() / g_ref.abs()).max() <= 1e-6
    a, b = state(run), state(single)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-12)
    ours, theirs = records(run / "metrics.jsonl"), records(single / "metrics.jsonl")
    assert [r["type"] for r in ours] == [r["type"] for r in theirs]
    losses = [(x["loss"], y["loss"]) for x, y in zip(ours, theirs) if "loss" in x]
    assert len(losses) > 6 and all(abs(x - y) <= 1e-9 * abs(y) for x, y in losses)


def _checkpointed(run: Path) -> int:
    """Updates in the run's checkpoint; 0 while there is none (or it is being replaced)."""
    try:
        return json.loads((run / "checkpoint/meta.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


def _worker_of_rank(parent: int, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker process of the given rank (read from /proc)."""
    while time.time() < deadline:
        children = []
        for task in Path(f"/proc/{parent}/task").iterdir():  # any thread may have started it
            try:
                children += (task / "children").read_text().split()
            except OSError:
                continue
        for pid in children:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} appeared")


def test_query_parallel_killed_and_resumed_is_bitwise_the_single_process_run(
    tmp_path, tiny_folder, cls_jsonl, query_reference
):
    """kill -9 of rank 1 mid-run: rank 0 exits with a clear error within the timeout. The run
    resumes from its last checkpoint on 2 ranks (rank 0 reads it, step scale included, and hands
    it to rank 1) and ends bit for bit where one process ends: state, logs, evaluations, adapter."""
    run = tmp_path / "query"
    args = cli_args(tiny_folder, cls_jsonl, run, **{"train.parallel": "query"})
    job = subprocess.Popen(
        launcher() + ["-m", "zotune.cli", "train", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + TIMEOUT
        victim = _worker_of_rank(job.pid, 1, deadline)
        # Wait for the checkpoint itself (written after the step's replay line) to reach 5.
        while time.time() < deadline and job.poll() is None:
            if _checkpointed(run) >= 5:
                break
            time.sleep(0.01)
        # Frozen first, so the job cannot finish before the kill; then killed.
        os.kill(victim, signal.SIGSTOP)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.time()
        _, err = job.communicate(timeout=TIMEOUT)
    finally:
        job.kill()
    assert job.returncode != 0 and time.time() - t_kill < 60
    lines = [line for line in err.splitlines() if line.startswith("zotune: error: rank 0")]
    assert len(lines) == 1, err[-3000:]
    assert not (run / "summary.json").exists()
    done = json.loads((run / "checkpoint/meta.json").read_text())["done"]
    assert 5 <= done < STEPS

    job = torchrun([*args, "--resume"])
    assert job.returncode == 0, job.stderr[-3000:]
    a, b = state(run), state(query_reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("lora_B"))
    # g, lr, losses, and the sharded evaluations: the same bits, line for line.
    for log in ("replay.jsonl", "metrics.jsonl"):
        assert records(run / log) == records(query_reference / log), log
    assert (run / "adapter/adapter_model.safetensors").read_bytes() == (
        query_reference / "adapter/adapter_model.safetensors"
    ).read_bytes()
    # The step scale ran: step 0 has no g before it (lr 0), later steps are scaled.
    lrs = [r["lr"] for r in records(run / "replay.jsonl") if r["type"] == "step"]
    assert lrs[0] == 0.0 and all(0 < lr != 0.01 for lr in lrs[1:])
    # Only losses crossed the wire: 2q losses + one NaN flag per rank, in fp32, each step.
    report = json.loads((run / "distributed.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == STEPS - done
    assert report["traffic"]["step"]["bytes"] == (STEPS - done) * (2 * 4 + 2) * 4
    # The replay log of the distributed run rebuilds its final adapter exactly.
    rebuilt = load_file(
        replay(str(run / "replay.jsonl"), str(tmp_path / "replayed")) / "adapter_model.safetensors"
    )
    keys = [k for k in a if k.startswith("param.") and k.endswith("lora_B")]
    for key in keys:
        layer = key[len("param.") : -len(".lora_B")]
        assert torch.equal(rebuilt[f"base_model.model.{layer}.lora_B.weight"], a[key])


def test_bad_split_fails_on_every_rank_before_any_model_loads(tmp_path, cls_jsonl):
    run = tmp_path / "run"
    # The model folder does not exist: reaching the model would give another error.
    args = cli_args(
        str(tmp_path / "no-model"), cls_jsonl, run, **{"train.parallel": "data", "optim.batch_size": 3}
    )
    job = torchrun(args)
    assert job.returncode != 0
    errors = [line for line in job.stderr.splitlines() if line.startswith("zotune: error:")]
    assert len(errors) == 2 and all(
        "world size 2 does not divide optim.batch_size 3" in line for line in errors
    ), job.stderr[-3000:]
    assert job.stderr.count("exitcode  : 2") == 2  # torchrun's report: status 2 on both ranks
    assert not run.exists()


def test_ranks_with_different_configs_refuse_to_train(tmp_path, tiny_folder, cls_jsonl):
    """Two 'hosts' (two torchrun agents, one rank each) whose configs differ."""
    run = tmp_path / "run"
    args = cli_args(tiny_folder, cls_jsonl, run, **{"train.parallel": "query"})
    port = free_port()
    nodes = [
        subprocess.Popen(
            launcher(1, port, ["--nnodes", "2", "--node_rank", str(i)])
            + ["-m", "zotune.cli", "train", *args, *extra],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, extra in ((0, []), (1, ["--optim.lr", "0.5"]))
    ]
    try:
        errs = [node.communicate(timeout=TIMEOUT)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode != 0 for node in nodes)
    first = [[line for line in e.splitlines() if line.startswith("zotune: error:")] for e in errs]
    assert len(first[0]) == 1 and "config differs between ranks" in first[0][0], errs[0][-3000:]
    assert len(first[1]) == 1 and "optim.lr is 0.5 here, 0.01 on rank 0" in first[1][0]
    assert not (run / "checkpoint").exists() and not (run / "metrics.jsonl").exists()


def test_nan_on_one_rank_refuses_the_step_on_every_rank(tmp_path, tiny_folder):
    job = subprocess.run(
        launcher() + [str(WORKER), tiny_folder, str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(results) == {"data", "query"}
        for mode, r in results.items():
            assert "NaN on rank(s) [1]" in r["error"] and r["unchanged"], (rank, mode, r)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"train.parallel": "none"}, "train.parallel is 'none' but torchrun started 2 processes"),
        ({"train.parallel": "query", "optim.q": 3}, "world size 2 does not divide optim.q 3"),
        (
            {"train.parallel": "data", "optim.batch_size": 5},
            "world size 2 does not divide optim.batch_size 5",
        ),
        ({"train.parallel": "data", "optim.estimator": "rge"}, "needs optim.estimator prge"),
    ],
)
def test_split_is_checked_from_the_config_alone(tmp_path, overrides, message):
    from zotune.errors import ConfigError
    from zotune.train.distributed import check_split

    cfg = load_config(None, [x for k, v in overrides.items() for x in (f"--{k}", str(v))])
    with pytest.raises(ConfigError, match=message):
        check_split(cfg, 2)


def test_a_split_that_divides_passes():
    from zotune.train.distributed import check_split

    check_split(load_config(None, ["--train.parallel", "query", "--optim.q", "3"]), 3)
    check_split(load_config(None, ["--train.parallel", "data", "--optim.batch_size", "6"]), 3)


def test_parallel_is_a_checked_choice():
    from zotune.errors import ConfigError

    with pytest.raises(ConfigError, match="train.parallel: expected one of"):
        load_config(None, ["--train.parallel", "model"])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dual", [True, False])
def test_a_query_range_measures_its_slots_of_the_full_step(tokenizer, fused, dual):
    """What a query-parallel rank measures, in the per-layer and the flat (accelerator) form:
    the losses of its queries, bit for bit those of the full step; given the full losses back
    from its reduce, it makes the full step's update."""
    from helpers import randomize, synthetic_batch
    from zotune.adapters.lora import LoRAAdapter
    from zotune.estimators.prge import PRGEStep
    from zotune.loss import ClassificationLoss, mean_loss
    from zotune.models.tiny import make_tiny_model

    q, seed, batch = 4, torch.tensor([3]), synthetic_batch()
    model = make_tiny_model("qwen2", tokenizer)
    adapter = LoRAAdapter(model, rank=4, alpha=8)
    randomize(adapter.tensors())
    start = adapter.state()
    full = []
    step = PRGEStep(
        model,
        adapter,
        ClassificationLoss(),
        q,
        dual=dual,
        fused_noise=fused,
        reduce=lambda s, c: full.append(mean_loss(s, c)) or full[-1],
    )
    step(seed, 1e-2, 1e-2, *batch)
    reference = adapter.state()
    for lo, hi in ((0, 1), (1, 4)):
        adapter.load_state(start)
        seen = []

        def reduce(sums, counts, seen=seen):
            seen.append(mean_loss(sums, counts))
            return full[0]

        PRGEStep(
            model,
            adapter,
            ClassificationLoss(),
            q,
            dual=dual,
            fused_noise=fused,
            queries=(lo, hi),
            reduce=reduce,
        )(seed, 1e-2, 1e-2, *batch)
        k = hi - lo
        assert torch.equal(seen[0], torch.cat([full[0][lo:hi], full[0][q + lo : q + hi]]))
        assert seen[0].shape == (2 * k,)
        assert all(torch.equal(adapter.state()[n], reference[n]) for n in reference)
