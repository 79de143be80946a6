"""Data- and query-parallel P-RGE over torch.distributed: many processes, one adapter.

Every rank regenerates z from the step's seed, so a step exchanges losses, never weights:
- data: rank r scores rows [r*b/R, (r+1)*b/R) of the step's global batch under all 2q replicas,
  and one all-reduce adds the per-replica loss sums and token counts of the ranks (the global
  mean is then exact even when the ranks' slices hold different numbers of tokens);
- query: rank r evaluates queries [r*q/R, (r+1)*q/R) on the whole batch, and one all-reduce adds
  the ranks' 2q losses, each rank's slots filled and zeros elsewhere: x + 0 is exact, so every
  rank holds the single-process losses bit for bit.
Both buffers carry one NaN flag per rank. Every rank then computes the same g and applies the
same update itself. Rank 0 alone writes; evaluation chunks are split over the ranks and their
scores gathered. Started by torchrun (env://): gloo for CPU tensors, NCCL for CUDA ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from zotune.config import Config
from zotune.errors import ConfigError, ZotuneError
from zotune.eval import score_chunks
from zotune.io import atomic_write_text
from zotune.loss import mean_loss

# Score dtypes an evaluation gather may carry (as float64, which holds each of them exactly).
_FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
_MAX_OUTPUTS = 3


def world_size() -> int:
    """Processes in this job: torchrun's WORLD_SIZE, 1 when started without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_split(cfg: Config, world: int) -> None:
    """The config can be split over `world` ranks: checked before any model loads."""
    t, o = cfg.train, cfg.optim
    if t.parallel == "none":
        raise ConfigError(
            f"train.parallel is 'none' but torchrun started {world} processes: set "
            "--train.parallel data (split the batch) or query (split the queries)"
        )
    if o.estimator != "prge":
        raise ConfigError(f"train.parallel {t.parallel}: needs optim.estimator prge, got '{o.estimator}'")
    n, what = (o.batch_size, "optim.batch_size") if t.parallel == "data" else (o.q, "optim.q")
    if n % world:
        raise ConfigError(
            f"train.parallel {t.parallel}: world size {world} does not divide "
            f"{what} {n} (each rank takes {what} / world size)"
        )


def digest(chunks) -> int:
    """A 63-bit hash of byte strings / tensors, as an int64 for a collective."""
    h = hashlib.sha256()
    for c in chunks:
        if isinstance(c, torch.Tensor):  # its raw bytes, whatever the dtype
            c = c.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(c)
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _first_difference(mine: dict, theirs: dict, prefix: str = "") -> str | None:
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} is {a!r} here, {b!r} on rank 0"
    return None


def _pack(items) -> bytes:
    """A tuple of tensor dicts and JSON values -> bytes (JSON header + safetensors; no pickle)."""
    tensors, kinds = {}, []
    for i, item in enumerate(items):
        if isinstance(item, dict) and item and all(isinstance(v, torch.Tensor) for v in item.values()):
            tensors.update({f"{i}/{k}": v.detach().cpu().contiguous() for k, v in item.items()})
            kinds.append({"tensors": sorted(item)})
        else:
            kinds.append({"json": item})
    head = json.dumps({"items": kinds}).encode()
    return len(head).to_bytes(8, "little") + head + save_tensors(tensors)


def _pack_error(message: str) -> bytes:
    head = json.dumps({"error": message}).encode()
    return len(head).to_bytes(8, "little") + head


def _unpack(blob: bytes):
    n = int.from_bytes(blob[:8], "little")
    head = json.loads(blob[8 : 8 + n])
    if "error" in head:
        raise ZotuneError(head["error"])
    tensors = load_tensors(blob[8 + n :])
    return tuple(
        {k: tensors[f"{i}/{k}"] for k in kind["tensors"]} if "tensors" in kind else kind["json"]
        for i, kind in enumerate(head["items"])
    )


class Ranks:
    """This process's place in the job, and the few collectives training needs. Answers the loop's
    questions (train/loop.py OneProcess) for many processes."""

    def __init__(self, cfg: Config):
        self.rank, self.world = int(os.environ["RANK"]), world_size()
        self.mode = cfg.train.parallel
        self.main = self.rank == 0
        self.q, self.b = cfg.optim.q, cfg.optim.batch_size
        # Bytes this rank contributed to collectives, by purpose (the benchmark reads them).
        self.traffic = {k: {"bytes": 0, "calls": 0} for k in ("start", "step", "check", "eval")}
        self.steps = 0  # steps reduced by this process
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        try:
            dist.init_process_group(
                "cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.train.dist_timeout_s)
            )
        except (RuntimeError, ValueError) as e:
            raise ZotuneError(f"rank {self.rank}: cannot join the torchrun job: {_line(e)}") from None

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives ---------------------------------------------------------------------------

    def _call(self, purpose: str, op, tensor: torch.Tensor, *args):
        self.traffic[purpose]["bytes"] += tensor.numel() * tensor.element_size()
        self.traffic[purpose]["calls"] += 1
        try:
            return op(tensor, *args)
        except RuntimeError as e:  # gloo / NCCL errors, timeouts included
            raise ZotuneError(
                f"rank {self.rank}: a collective ({purpose}) failed: another rank "
                f"stopped or is unreachable ({_line(e)}); continue with --resume "
                "once every rank can run"
            ) from None

    def _all_reduce(self, purpose: str, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        self._call(purpose, lambda t: dist.all_reduce(t, op=op), x)
        return x

    def _all_gather(self, purpose: str, x: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(x) for _ in range(self.world)]
        self._call(purpose, lambda t: dist.all_gather(out, t), x)
        return out

    def _hashes(self, purpose: str, value: int) -> list[int]:
        return [int(h) for h in self._all_gather(purpose, torch.tensor([value], dtype=torch.int64))]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (decisions that must agree)."""
        x = torch.tensor([int(flag)], dtype=torch.int64)
        return bool(self._all_reduce("step", x, dist.ReduceOp.MAX))

    def from_main(self, read):
        """read() on rank 0; its result (tensor dicts and JSON values) on every rank. Used at
        start-up only: the resume state, which every rank then checks it holds identically."""
        blob = b""
        if self.main:
            try:
                blob = _pack(read())
            except (ZotuneError, OSError, ValueError) as e:
                blob = _pack_error(str(e))
        size = self._all_reduce("start", torch.tensor([len(blob)], dtype=torch.int64))
        data = (
            torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            if self.main
            else torch.empty(int(size), dtype=torch.uint8)
        )
        self._call("start", lambda t: dist.broadcast(t, 0), data)
        return _unpack(data.numpy().tobytes())

    # -- start-up checks -----------------------------------------------------------------------

    def check_config(self, cfg: Config) -> None:
        """Every rank resolved the same config (same file, same overrides)."""
        hashes = self._hashes("start", digest([cfg.to_yaml().encode()]))
        bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if not bad:
            return
        (theirs,) = self.from_main(lambda: (cfg.to_dict(),))
        where = _first_difference(cfg.to_dict(), theirs)
        detail = f": {where}" if where else f" (rank(s) {bad} differ from rank 0)"
        raise ConfigError(
            f"rank {self.rank}: the resolved config differs between ranks{detail}; "
            "start every rank with the same --config file and overrides"
        )

    def check_model(self, model) -> None:
        """Every rank loaded the same weights."""
        tensors = [
            t for _, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items())
        ]
        self._same("start", digest(tensors), "model weights")

    def check_state(self, engine, scale: dict) -> None:
        """Every rank holds the same trained tensors, momentum and step scale (start-up, every
        checkpoint). The scale is a function of the g sequence, which every rank computes alike."""
        state = engine.state()
        scale_bytes = json.dumps(scale, sort_keys=True).encode()
        self._same(
            "check", digest([state[k] for k in sorted(state)] + [scale_bytes]), "adapter state or step scale"
        )

    def _same(self, purpose: str, value: int, what: str) -> None:
        hashes = self._hashes(purpose, value)
        bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if bad:
            raise ZotuneError(
                f"rank {self.rank}: rank(s) {bad} hold other {what} than rank 0 "
                f"(hash {hashes[bad[0]]:016x} vs {hashes[0]:016x}); every rank "
                "must start from the same model files and checkpoint"
            )

    # -- the step ------------------------------------------------------------------------------

    def queries(self) -> tuple[int, int]:
        return self.rank * self.q // self.world, (self.rank + 1) * self.q // self.world

    def rows(self) -> tuple[int, int]:
        return self.rank * self.b // self.world, (self.rank + 1) * self.b // self.world

    def step_options(self) -> dict:
        """PRGEStep's queries and reduce for this rank."""
        if self.mode == "query":
            return {"queries": self.queries(), "reduce": self.reduce_queries}
        return {"reduce": self.reduce_rows}

    def shard(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's rows of the step's batch (data mode), or all of it (query mode)."""
        if self.mode != "data":
            return batch
        lo, hi = self.rows()
        return tuple(t[lo:hi] for t in batch)

    def _flags(self, x: torch.Tensor) -> torch.Tensor:
        flags = x.new_zeros(self.world)  # [R]: 1 at this rank if it measured a NaN
        flags[self.rank] = torch.isnan(x).any().to(x.dtype)
        return flags

    def _refuse_nan(self, flags: torch.Tensor) -> None:
        if bool(flags.any()):
            bad = flags.nonzero().reshape(-1).tolist()
            raise ZotuneError(
                f"the loss is NaN on rank(s) {bad}: the step is refused on every "
                "rank and nothing of it is written; lower optim.lr or optim.eps"
            )

    def reduce_rows(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Data mode: this rank's per-replica sums and counts [2q] -> the global losses [2q]."""
        n = sums.numel()
        buf = torch.cat([sums, counts.to(sums.dtype), self._flags(sums)])  # [4q + R]
        self._all_reduce("step", buf)
        self.steps += 1
        self._refuse_nan(buf[2 * n :])
        return mean_loss(buf[:n], buf[n : 2 * n])

    def reduce_queries(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Query mode: this rank's losses of queries [lo, hi) (sign-major [2k]) -> all 2q."""
        lo, hi = self.queries()
        k, q = hi - lo, self.q
        local = mean_loss(sums, counts)  # [2k]
        buf = local.new_zeros(2 * q + self.world)  # [2q + R]
        buf[lo:hi], buf[q + lo : q + hi] = local[:k], local[k:]
        buf[2 * q :] = self._flags(local)
        self._all_reduce("step", buf)
        self.steps += 1
        self._refuse_nan(buf[2 * q :])
        return buf[: 2 * q]

    # -- evaluation ----------------------------------------------------------------------------

    def score_chunks(self, engine, batch, chunks: list[torch.Tensor], kind: str):
        """eval.score_chunks of every chunk, each rank scoring a contiguous share of them: the
        same chunks one process scores, so the same scores."""
        bounds = [len(chunks) * r // self.world for r in range(self.world + 1)]
        own = score_chunks(engine, batch, chunks[bounds[self.rank] : bounds[self.rank + 1]], kind)
        outs = [torch.cat(p) for p in zip(*own)]  # per output: [rows, ...]
        # What each rank scored: output count, then (width, ndim, dtype) per output.
        head = torch.zeros(1 + 3 * _MAX_OUTPUTS, dtype=torch.int64)
        head[0] = len(outs)
        for i, o in enumerate(outs):
            head[1 + 3 * i : 4 + 3 * i] = torch.tensor([o[0].numel(), o.dim(), _FLOATS.index(o.dtype)])
        heads = self._all_gather("eval", head)
        spec = next(h for h in heads if h[0] > 0)  # a rank that scored something
        n_out = int(spec[0])
        widths = [int(spec[1 + 3 * i]) for i in range(n_out)]
        sizes = [len(c) for c in chunks]
        rows = [sum(sizes[bounds[r] : bounds[r + 1]]) for r in range(self.world)]
        device = outs[0].device if outs else torch.device("cpu")
        flat = torch.zeros(max(rows), sum(widths), dtype=torch.float64, device=device)  # [rows, W]
        if outs:
            flat[: rows[self.rank]] = torch.cat([o.reshape(len(o), -1).double() for o in outs], 1)
        blocks = self._all_gather("eval", flat)
        parts = []
        for r in range(self.world):
            start = 0
            for size in sizes[bounds[r] : bounds[r + 1]]:
                cols = blocks[r][start : start + size].cpu().split(widths, 1)
                start += size
                parts.append(tuple(_restore(c, spec[1 + 3 * i : 4 + 3 * i]) for i, c in enumerate(cols)))
        return parts

    def write_traffic(self, run_dir: Path, steps: int) -> None:
        """run_dir/distributed.json: what this job's collectives carried (rank 0's share)."""
        if self.main:
            report = {
                "world_size": self.world,
                "parallel": self.mode,
                "steps": steps,
                "traffic": self.traffic,
            }
            atomic_write_text(Path(run_dir) / "distributed.json", json.dumps(report, indent=1))


def _restore(cols: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """A gathered [rows, width] float64 block -> the scores' own shape and dtype."""
    _, ndim, dtype = (int(v) for v in spec)
    return (cols.reshape(-1) if ndim == 1 else cols).to(_FLOATS[dtype])


def _stopped(signum, frame):
    rank = os.environ.get("RANK", "?")
    raise ZotuneError(
        f"rank {rank}: stopped by the launcher (signal {signum}), which happens when "
        "another rank fails; continue with --resume"
    )


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


class ShardedEngine:
    """An engine as the loop sees it on one rank: the step works on this rank's share, evaluation
    is sharded; everything else (state, load_state, adapter_state, ...) is the engine's."""

    def __init__(self, engine, ranks: Ranks):
        self.engine, self.ranks = engine, ranks

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self, batch, seed: int, lr: float, eps: float):
        return self.engine.step(self.ranks.shard(batch), seed, lr, eps)

    def score_chunks(self, batch, chunks, kind: str):
        return self.ranks.score_chunks(self.engine, batch, chunks, kind)


def train(
    cfg: Config, resume: bool = False, stop_after: int | None = None, overwrite: bool = False
) -> dict | None:
    """`zotune train` on one rank of a torchrun job."""
    # torchrun stops the other workers with SIGTERM when one fails: each says so in one line.
    signal.signal(signal.SIGTERM, _stopped)
    try:
        summary = _train(cfg, resume, stop_after, overwrite)
    except ZotuneError:
        # This rank exits with its own error: a SIGTERM now would only replace its status 2.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return summary


def _train(cfg: Config, resume: bool, stop_after: int | None, overwrite: bool) -> dict | None:
    from zotune.engines.eager import EagerEngine
    from zotune.train.loop import Trainer
    from zotune.train.run import adapter_saver, generation_judge, prepare, replay_header
    from zotune.train.rundir import check_run_dir

    check_split(cfg, world_size())  # before any model loads
    ranks = Ranks(cfg)
    try:
        ranks.check_config(cfg)
        # Rank 0 writes the run folder: it checks it, and every rank raises its error.
        ranks.from_main(lambda: (check_run_dir(cfg, resume, overwrite),))
        model, tokenizer, splits = prepare(cfg)
        ranks.check_model(model)
        engine = EagerEngine(model, cfg, splits.kind, ranks.step_options())
        trainer = Trainer(
            cfg,
            ShardedEngine(engine, ranks),
            splits,
            Path(cfg.train.out_dir),
            adapter_saver(cfg, engine),
            replay_header(cfg, engine.params),
            # Every rank decodes the whole split (the same text, so the same selection).
            judge=generation_judge(cfg, model, tokenizer, splits),
            procs=ranks,
        )
        summary = trainer.run(resume=resume, stop_after=stop_after)
        ranks.write_traffic(cfg.train.out_dir, ranks.steps)
        return summary
    finally:
        ranks.close()
