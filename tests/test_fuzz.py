"""Generated malformed inputs for the file readers: the config loader, the JSONL reader, the replay
log and checkpoints. Each input either loads cleanly or raises one ZotuneError (one `zotune: error:`
line from the CLI), never another exception, and a failed command leaves no output behind.

Inputs come from three kinds of strategies: structural mutations of a real valid file (a value
anywhere in its JSON / YAML tree replaced by a value of another type, or deleted), byte-level
damage to the same file (truncations, flipped or inserted bytes), and random bytes."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from zotune.cli import main, read_config
from zotune.errors import ZotuneError
from zotune.train.checkpoint import META, STATE, load_checkpoint
from zotune.train.run import train

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies ---------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(tree, prefix=()):
    """Every position in a JSON-like tree (the root included)."""
    yield prefix
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


@st.composite
def mutated_tree(draw, tree):
    """`tree` with one value replaced by an arbitrary JSON value, or deleted."""
    path = draw(st.sampled_from(list(_paths(tree))))
    new = copy.deepcopy(tree)
    if not path:
        return draw(JSON_VALUES)
    parent = new
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        parent[path[-1]] = draw(JSON_VALUES)
    else:
        del parent[path[-1]]
    return new


@st.composite
def damaged(draw, data: bytes):
    """`data` truncated, with bytes flipped, or with bytes inserted."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    i = draw(st.integers(0, len(out)))
    return bytes(out[:i]) + draw(st.binary(min_size=1, max_size=8)) + bytes(out[i:])


RANDOM_BYTES = st.binary(max_size=300)


def jsonl_bytes(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@st.composite
def mutated_lines(draw, records: list[dict]):
    """JSON Lines with one line's tree mutated (the header, a step, a record ...)."""
    i = draw(st.integers(0, len(records) - 1))
    out = list(records)
    out[i] = draw(mutated_tree(records[i]))
    return jsonl_bytes(out)


# -- the valid files the strategies start from ----------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_folder, cls_jsonl):
    """A finished tiny run: its config, replay log and checkpoint are the valid inputs."""
    folder = tmp_path_factory.mktemp("fuzz-run")
    cfg = tiny_config(tiny_folder, cls_jsonl, folder / "run", **{"train.steps": 4})
    train(cfg)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    return folder


def _outcome(call) -> str:
    """'ok' or 'error' (a ZotuneError, which the CLI prints as one line); any other exception fails
    the test."""
    try:
        call()
    except ZotuneError as e:
        assert str(e).strip()
        return "error"
    return "ok"


def _cli(argv: list[str]) -> int:
    """cli.main in-process: 0, or 2 with exactly one `zotune: error:` line on stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    lines = err.getvalue().splitlines()
    assert rc in (0, 2), (rc, err.getvalue())
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("zotune: error: "), lines
    return rc


# -- the readers ----------------------------------------------------------------------------------


def test_config_loader(run, tmp_path):
    valid = (run / "config.yaml").read_bytes()
    tree = yaml.safe_load(valid)
    path = tmp_path / "config.yaml"
    seen = set()

    @FUZZ
    @given(
        st.one_of(mutated_tree(tree).map(lambda t: yaml.safe_dump(t).encode()), damaged(valid), RANDOM_BYTES)
    )
    def check(data):
        path.write_bytes(data)
        seen.add(_outcome(lambda: read_config(str(path), [])))

    check()
    assert seen == {"ok", "error"}


def test_jsonl_reader(cls_jsonl, tmp_path):
    valid = Path(cls_jsonl).read_bytes()
    records = [json.loads(line) for line in valid.decode().splitlines()]
    kinds = [
        {"text": "some text"},
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"prompt": "Sky:", "choices": [" blue", " green"], "answer": 0},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    path = tmp_path / "data.jsonl"
    sizes = ["--data.train_size", "8", "--data.dev_size", "4", "--data.test_size", "4"]
    seen = set()

    @FUZZ
    @given(
        st.one_of(
            mutated_lines(records[:20]),
            st.sampled_from(kinds).flatmap(lambda r: mutated_lines([r] * 20)),
            damaged(valid),
            RANDOM_BYTES,
        )
    )
    def check(data):
        path.write_bytes(data)
        seen.add(_cli(["data", "--data.task", f"jsonl:{path}", *sizes]))

    check()
    assert seen == {0, 2}


def test_replay_log_reader(run, tmp_path):
    valid = (run / "run" / "replay.jsonl").read_bytes()
    records = [json.loads(line) for line in valid.decode().splitlines()]
    log, out = tmp_path / "replay.jsonl", tmp_path / "rebuilt"
    seen = set()

    @FUZZ
    @given(st.one_of(mutated_lines(records), damaged(valid), RANDOM_BYTES))
    def check(data):
        log.write_bytes(data)
        shutil.rmtree(out, ignore_errors=True)
        rc = _cli(["replay", str(log), "--out", str(out)])
        seen.add(rc)
        assert out.exists() == (rc == 0)  # nothing written on an error
        leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("replay.jsonl", "rebuilt")]
        assert not leftovers, leftovers

    check()
    assert seen == {0, 2}


def test_checkpoint_reader(run, tmp_path):
    source = run / "run" / "checkpoint"
    state, meta = (source / STATE).read_bytes(), (source / META).read_bytes()
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    seen = set()

    @FUZZ
    @given(
        st.one_of(
            st.tuples(st.just(state), mutated_tree(json.loads(meta)).map(lambda t: json.dumps(t).encode())),
            st.tuples(st.just(state), damaged(meta) | RANDOM_BYTES),
            st.tuples(damaged(state) | RANDOM_BYTES, st.just(meta)),
        )
    )
    def check(files):
        (folder / STATE).write_bytes(files[0])
        (folder / META).write_bytes(files[1])
        seen.add(_outcome(lambda: load_checkpoint(folder)))

    check()
    assert seen == {"ok", "error"}


# -- cases the fuzzing found, through the command line ----------------------------------------------


def test_found_cases_from_the_command_line(run, tmp_path):
    records = [json.loads(line) for line in (run / "run" / "replay.jsonl").read_text().splitlines()]
    # A header field of the wrong type; a step's seed as a float.
    bad_header = [{**records[0], "momentum": "0.9"}, *records[1:]]
    bad_step = [records[0], {**records[1], "seed": 1.5}, *records[2:]]
    for name, lines in (("header.jsonl", bad_header), ("step.jsonl", bad_step)):
        (tmp_path / name).write_bytes(jsonl_bytes(lines))
    # A JSONL record whose label is a list; a config truncated inside a quoted string.
    (tmp_path / "data.jsonl").write_bytes(b'{"input": "a", "label": "x"}\n{"input": "b", "label": ["x"]}\n')
    (tmp_path / "config.yaml").write_bytes(b'model:\n  name: "tiny')
    cases = [
        (["replay", str(tmp_path / "header.jsonl"), "--out", str(tmp_path / "o1")], "field 'momentum'"),
        (["replay", str(tmp_path / "step.jsonl"), "--out", str(tmp_path / "o2")], "field 'seed'"),
        (["data", "--data.task", f"jsonl:{tmp_path / 'data.jsonl'}"], "line 2, field 'label'"),
        (["data", "--config", str(tmp_path / "config.yaml")], "line 2"),
    ]
    for argv, where in cases:
        proc = subprocess.run([sys.executable, "-m", "zotune.cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("zotune: error: "), lines
        assert where in lines[0] and "Traceback" not in proc.stderr and not proc.stdout, lines
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
