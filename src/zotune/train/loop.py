"""The training loop, shared by every engine: batches, seeds and schedule on the host; the step on
the engine; evaluation on dev every N steps with model selection by dev only; the test split once
at the end; JSONL metrics and replay logs; atomic checkpoints and exact resume; PEFT adapter out."""

from __future__ import annotations

import contextlib
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from zotune.checks import all_finite
from zotune.config import Config
from zotune.engines.base import Engine
from zotune.errors import ZotuneError
from zotune.eval import calibrated_accuracy, evaluate
from zotune.io import atomic_write_text, remove_orphans
from zotune.loss import batch_tensors
from zotune.rng import step_seed
from zotune.train.checkpoint import load_checkpoint, save_checkpoint
from zotune.train.logs import JsonlLog
from zotune.train.plot import plot_run
from zotune.train.rundir import clear_stale_outputs
from zotune.train.scale import StepScale
from zotune.train.schedule import lr_at


@dataclass
class Splits:
    """A task's three splits, tokenised to static shapes."""

    kind: str
    train: object
    dev: object
    test: object
    examples: dict | None = None  # split name -> its Examples (generation is judged on their text)


def batch_indices(n: int, b: int, step: int, seed: int) -> torch.Tensor:
    """The examples of one step: a seeded permutation per epoch, so any step's batch is known
    from (seed, step) alone and a resumed run sees the same data."""
    per_epoch = max(1, n // b)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * b : (pos + 1) * b]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _score(result: dict) -> float:
    """Higher is better: accuracy for classification, the generation score when generation is
    judged (eval_generate.PRIMARY), else minus the loss."""
    if "accuracy" in result:
        return result["accuracy"]
    return result["score"] if "score" in result else -result["loss"]


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "logits"}


class _StepResult(NamedTuple):
    loss: float
    g: torch.Tensor  # [q]
    seed: int
    lr: float  # what the step applied (after the step scale), and what replay re-applies
    lr_schedule: float
    tokens: int  # real (unpadded) tokens through the model, all replicas


class _Clock:
    """Wall time since the loop started, and training time: wall time minus what evaluation and
    checkpoints took (what steps/s, tokens/s and train.time_limit_s are measured in). Both are
    read when a step ends."""

    def __init__(self):
        self.t0, self.aside_s, self.tokens = time.perf_counter(), 0.0, 0
        self.wall = self.elapsed = 0.0

    def count(self, tokens: int) -> None:
        """A step ended: its tokens count, and wall / elapsed are read now."""
        self.tokens += tokens
        self.wall = time.perf_counter() - self.t0
        self.elapsed = self.wall - self.aside_s

    def since_start(self) -> float:
        return time.perf_counter() - self.t0

    @contextlib.contextmanager
    def aside(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.aside_s += time.perf_counter() - t


class OneProcess:
    """What the loop asks of the processes that train together, answered for a run on one.
    train/distributed.py answers the same for the ranks of a torchrun job."""

    main = True  # writes logs, checkpoints and outputs

    def from_main(self, read):
        """read() on the main process, its result on every process (start-up files)."""
        return read()

    def check_state(self, engine, scale: dict) -> None:
        """Every process holds the same trained state and step scale (nothing to compare with
        one)."""

    def any(self, flag: bool) -> bool:
        return flag


class Trainer:
    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        splits: Splits,
        run_dir: Path,
        save_adapter,
        replay_header: dict | None = None,
        judge=None,
        procs=None,
    ):
        self.cfg, self.engine, self.splits = cfg, engine, splits
        self.judge = judge  # split name -> generation metrics (eval_generate), or None
        self.run_dir = Path(run_dir)
        self.save_adapter = save_adapter  # (state, folder) -> None
        self.replay_header = replay_header
        self.procs = procs or OneProcess()
        self.main = self.procs.main  # only the main process writes
        self.metrics = JsonlLog(self.run_dir / "metrics.jsonl", self.main)
        self.replay = JsonlLog(self.run_dir / "replay.jsonl", self.main)
        self.ckpt_dir = self.run_dir / "checkpoint"
        self.best_dir = self.run_dir / "best"
        self.best_state = None  # the dev-selected state, kept in memory for the final test
        # First-order optimizers (AdamW) have their own scale-free steps: normalize is ZO-only.
        zo = cfg.optim.estimator != "fo"
        self.scale = StepScale(cfg.optim.normalize if zo else "none", cfg.optim.rms_decay)

    def _eval(self, split: str, done: int, kind: str | None = "eval") -> dict:
        """kind None: not logged."""
        t = self.cfg.train
        batch = getattr(self.splits, split)
        result = evaluate(self.engine, batch, self.splits.kind, t.eval_batch_size)
        if self.judge is not None:
            result.update(self.judge(split))
        if kind is not None:
            self.metrics.write({"type": kind, "split": split, "done": done, **_public(result)})
        return result

    def _checkpoint(self, done: int, best: dict) -> None:
        # Every rank computed the same g, so every rank's scale is the same: checked with the state.
        self.procs.check_state(self.engine, self.scale.state())
        if self.main:
            # The resolved config travels with the state: --resume checks it (train/rundir.py).
            meta = {"done": done, "best": best, "scale": self.scale.state(), "config": self.cfg.to_dict()}
            save_checkpoint(self.ckpt_dir, self.engine.state(), meta)

    def _select(self, done: int) -> None:
        """The engine's state becomes the best (dev-selected) state."""
        # Cloned: an engine's state may alias buffers its next call overwrites.
        self.best_state = {k: v.clone() for k, v in self.engine.state().items()}
        if self.main:
            save_checkpoint(self.best_dir, self.best_state, {"done": done})

    def _read_start(self):
        """-> (checkpoint tensors, its meta, best tensors, zero-shot results or None when
        zero_shot.json is missing or unreadable) of a run to resume."""
        tensors, meta = load_checkpoint(self.ckpt_dir)
        best, _ = load_checkpoint(self.best_dir)
        try:
            zero_shot = json.loads((self.run_dir / "zero_shot.json").read_text())
        except (OSError, ValueError):
            zero_shot = None
        if not (
            isinstance(zero_shot, dict) and all(isinstance(zero_shot.get(s), dict) for s in ("dev", "test"))
        ):
            zero_shot = None
        return tensors, meta, best, zero_shot

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict | None:
        """Train to cfg.train.steps (or stop after `stop_after` updates, as if killed right after
        a checkpoint: returns None). -> the run summary."""
        t = self.cfg.train
        start, best, zero_shot = self._setup(resume)
        clock = _Clock()
        done, last_eval = start, None
        bar = tqdm(
            range(start, t.steps),
            initial=start,
            total=t.steps,
            dynamic_ncols=True,
            disable=not (t.progress and self.main),
            desc=f"{self.cfg.optim.estimator}",
        )
        for step in bar:
            done = step + 1
            res = self._step(step)
            clock.count(res.tokens)
            # Every process must stop at the same step: the first out of time stops them all.
            out_of_time = t.time_limit_s is not None and self.procs.any(clock.elapsed >= t.time_limit_s)
            last = done == t.steps or out_of_time
            self._log(step, res, clock, start, last)
            with clock.aside():  # evaluation and checkpoints are not training time
                if done % t.eval_every == 0 or last:
                    last_eval, best = self._evaluate(done, best)
                if done % t.checkpoint_every == 0 or last:
                    self._checkpoint(done, best)
            bar.set_postfix(self._progress(res.loss, clock, start, done, last_eval))
            if stop_after is not None and done >= stop_after and done < t.steps:
                self._checkpoint(done, best)
                bar.close()
                return None
            if out_of_time:
                break
        bar.close()
        return self._finish(zero_shot, best, clock.since_start(), done)

    # -- the phases of a run ---------------------------------------------------------------------

    def _setup(self, resume: bool) -> tuple[int, dict, dict]:
        """A fresh run (logs reset, zero-shot evaluated, step-0 checkpoints), or the state of the
        last checkpoint with both logs cut back to it. -> (start step, best so far, zero-shot)"""
        train, b = self.splits.train, self.cfg.optim.batch_size
        if len(train) < b:
            raise ZotuneError(f"train split has {len(train)} examples, fewer than optim.batch_size={b}")
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_orphans(self.run_dir)  # temporary files of a run killed mid-write
            atomic_write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
        if resume:
            # Read by the main process and handed to every other (the scale is in the meta).
            tensors, meta, self.best_state, zero_shot = self.procs.from_main(self._read_start)
            if zero_shot is None:  # measured again: the engine still holds the starting state
                zero_shot = self._zero_shot(log=False)
            self.engine.load_state(tensors)
            start, best = meta["done"], meta["best"]
            if "scale" in meta:
                self.scale.load_state(meta["scale"])
            self.metrics.truncate(start)
            self.replay.truncate(start)
            self.procs.check_state(self.engine, self.scale.state())
            return start, best, zero_shot
        if self.main:
            clear_stale_outputs(self.run_dir)
        self.metrics.reset()
        self.replay.reset()
        if self.replay_header is not None:
            self.replay.write({"type": "header", "done": 0, **self.replay_header})
        zero_shot = self._zero_shot()
        best = {"score": _score(zero_shot["dev"]), "done": 0, "dev": zero_shot["dev"]}
        self._select(0)
        self._checkpoint(0, best)
        return 0, best, zero_shot

    def _step(self, step: int) -> _StepResult:
        """One update on the engine: the batch and seed are functions of (train.seed, step)."""
        t, o = self.cfg.train, self.cfg.optim
        idx = batch_indices(len(self.splits.train), o.batch_size, step, t.seed)
        batch = batch_tensors(self.splits.train.index(idx), self.splits.kind)
        lr_schedule = lr_at(step, t.steps, o.lr, o.schedule, o.warmup_steps, o.min_lr_ratio)
        lr = self.scale.lr(lr_schedule)
        seed = step_seed(t.seed, step)
        # Numbers are checked where they are made: nothing non-finite reaches the engine, a
        # checkpoint or the replay log.
        if not all_finite(lr):
            raise ZotuneError(
                f"step {step + 1}: the learning rate is {lr} (schedule {lr_schedule}, step scale "
                f"optim.normalize={o.normalize}); it must be a finite number"
            )
        loss, g = self.engine.step(batch, seed, lr, o.eps)
        bad = [what for what, x in (("the loss", loss), ("g", g)) if not all_finite(x)]
        if bad:
            verb = "are" if len(bad) == 2 else "is"
            raise ZotuneError(
                f"step {step + 1}: {' and '.join(bad)} {verb} not finite; lower optim.lr or optim.eps"
            )
        self.scale.update(g)
        replicas = 1 if o.estimator == "fo" else 2 * o.q
        return _StepResult(loss, g, seed, lr, lr_schedule, int(batch.attention_mask.sum()) * replicas)

    def _log(self, step: int, res: _StepResult, clock: _Clock, start: int, last: bool) -> None:
        """The step's replay line (always) and its metrics line (every log_every steps)."""
        t, done = self.cfg.train, step + 1
        self.replay.write(
            {
                "type": "step",
                "done": done,
                "step": step,
                "seed": res.seed,
                "lr": res.lr,
                "eps": self.cfg.optim.eps,
                "g": [float(x) for x in res.g],
            }
        )
        if done % t.log_every == 0 or last:
            elapsed = clock.elapsed
            self.metrics.write(
                {
                    "type": "train",
                    "done": done,
                    "loss": res.loss,
                    "lr": res.lr,
                    "lr_schedule": res.lr_schedule,
                    "time": elapsed,
                    "wall": clock.wall,
                    "steps_per_s": (done - start) / elapsed,
                    "tokens_per_s": clock.tokens / elapsed,
                }
            )

    def _evaluate(self, done: int, best: dict) -> tuple[dict, dict]:
        """Dev (and, with track_test, test) now; a better dev score becomes the best state."""
        result = self._eval("dev", done)
        if self.cfg.train.track_test:
            self._eval("test", done, "track")
        if _score(result) > best["score"]:
            best = {"score": _score(result), "done": done, "dev": _public(result)}
            self._select(done)
        return result, best

    @staticmethod
    def _progress(loss: float, clock: _Clock, start: int, done: int, last_eval) -> dict:
        elapsed = clock.elapsed
        post = {
            "loss": f"{loss:.4f}",
            "it/s": f"{(done - start) / elapsed:.2f}",
            "tok/s": f"{clock.tokens / elapsed:.0f}",
        }
        if last_eval is not None:
            post["dev"] = f"{_score(last_eval):.3f}"
        return post

    def _zero_shot(self, log: bool = True) -> dict:
        """The starting state on dev and test, written to zero_shot.json (and, with log, to the
        metrics)."""
        kind = "eval" if log else None
        dev, test = self._eval("dev", 0, kind), self._eval("test", 0, kind)
        out = {"dev": _public(dev), "test": _public(test)}
        if self.splits.kind == "classification" and dev["logits"].shape[1] == 2:
            threshold, acc = calibrated_accuracy(
                dev["logits"], self.splits.dev.labels, test["logits"], self.splits.test.labels
            )
            out["test_calibrated"] = {"accuracy": acc, "threshold": threshold}
            out["test_positive_rate"] = float((test["logits"].argmax(-1) == 0).float().mean())
        if self.main:
            atomic_write_text(self.run_dir / "zero_shot.json", json.dumps(out, indent=1))
        return out

    def _finish(self, zero_shot: dict, best: dict, wall: float, done: int) -> dict:
        final_state = self.engine.state()
        self.engine.load_state(self.best_state)  # model selection by dev only
        dev = best["dev"]  # measured when this state was selected
        test = _public(self._eval("test", best["done"], "final"))
        adapter_dir, plot = self.run_dir / "adapter", self.run_dir / "training.png"
        if self.main:
            self.save_adapter(self.engine.adapter_state(), adapter_dir)
        self.engine.load_state(final_state)
        if self.main:
            plot_run(self.metrics.read(), plot, f"{self.cfg.optim.estimator} on {self.cfg.data.task}")
        summary = {
            "zero_shot": zero_shot,
            "selected_step": best["done"],
            "dev": dev,
            "test": test,
            "steps": done,
            "train_wall_s": wall,
            "peak_rss_mb": peak_rss_mb(),
            "adapter": str(adapter_dir),
            "plot": str(plot),
            "config": self.cfg.to_dict(),
        }
        if self.main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary
