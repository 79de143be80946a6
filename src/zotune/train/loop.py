"""The training loop, shared by every engine: batches, seeds and schedule on the host; the step on
the engine; evaluation on dev every N steps with model selection by dev only; the test split once
at the end; JSONL metrics and replay logs; atomic checkpoints and exact resume; PEFT adapter out."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from zotune.config import Config
from zotune.errors import ZotuneError
from zotune.eval import calibrated_accuracy, evaluate
from zotune.loss import batch_tensors
from zotune.rng import step_seed
from zotune.train.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from zotune.train.logs import JsonlLog
from zotune.train.plot import plot_run
from zotune.train.schedule import lr_at


@dataclass
class Splits:
    """A task's three splits, tokenised to static shapes."""
    kind: str
    train: object
    dev: object
    test: object


def batch_indices(n: int, b: int, step: int, seed: int) -> torch.Tensor:
    """The examples of one step: a seeded permutation per epoch, so any step's batch is known
    from (seed, step) alone and a resumed run sees the same data."""
    per_epoch = max(1, n // b)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * b: (pos + 1) * b]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _score(result: dict) -> float:
    """Higher is better: accuracy for classification, minus loss for generation."""
    return result["accuracy"] if "accuracy" in result else -result["loss"]


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "logits"}


class OneProcess:
    """What the loop asks of the processes that train together, answered for a run on one.
    train/distributed.py answers the same for the ranks of a torchrun job."""
    main = True  # writes logs, checkpoints and outputs

    def from_main(self, read):
        """read() on the main process, its result on every process (start-up files)."""
        return read()

    def check_state(self, engine) -> None:
        """Every process holds the same trained state (nothing to compare with one)."""

    def any(self, flag: bool) -> bool:
        return flag


class Trainer:
    def __init__(self, cfg: Config, engine, splits: Splits, run_dir: Path, save_adapter,
                 replay_header: dict | None = None, procs=None):
        self.cfg, self.engine, self.splits = cfg, engine, splits
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

    def _eval(self, split: str, done: int, kind: str = "eval") -> dict:
        t = self.cfg.train
        batch = getattr(self.splits, split)
        result = evaluate(self.engine, batch, self.splits.kind, t.eval_batch_size)
        self.metrics.write({"type": kind, "split": split, "done": done, **_public(result)})
        return result

    def _checkpoint(self, done: int, best: dict) -> None:
        self.procs.check_state(self.engine)
        if self.main:
            save_checkpoint(self.ckpt_dir, self.engine.state(), {"done": done, "best": best})

    def _select(self, done: int) -> None:
        # Cloned: an engine's state may alias buffers its next call overwrites.
        self.best_state = {k: v.clone() for k, v in self.engine.state().items()}
        if self.main:
            save_checkpoint(self.best_dir, self.best_state, {"done": done})

    def _read_start(self):
        """-> (checkpoint tensors, its meta, best tensors, zero-shot results) of a run to resume."""
        tensors, meta = load_checkpoint(self.ckpt_dir)
        best, _ = load_checkpoint(self.best_dir)
        return tensors, meta, best, json.loads((self.run_dir / "zero_shot.json").read_text())

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict | None:
        """Train to cfg.train.steps (or stop after `stop_after` updates, as if killed right after
        a checkpoint: returns None). -> the run summary."""
        cfg, t, o = self.cfg, self.cfg.train, self.cfg.optim
        train = self.splits.train
        if len(train) < o.batch_size:
            raise ZotuneError(f"train split has {len(train)} examples, fewer than "
                              f"optim.batch_size={o.batch_size}")
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
        start, best, zero_shot = 0, {"score": None, "done": 0}, {}
        if resume:
            tensors, meta, self.best_state, zero_shot = self.procs.from_main(self._read_start)
            self.engine.load_state(tensors)
            start, best = meta["done"], meta["best"]
            self.metrics.truncate(start)
            self.replay.truncate(start)
            self.procs.check_state(self.engine)
        else:
            self.metrics.reset()
            self.replay.reset()
            if self.replay_header is not None:
                self.replay.write({"type": "header", "done": 0, **self.replay_header})
            zero_shot = self._zero_shot()
            best = {"score": _score(zero_shot["dev"]), "done": 0, "dev": zero_shot["dev"]}
            self._select(0)
            self._checkpoint(0, best)

        replicas = 1 if o.estimator == "fo" else 2 * o.q
        tokens = 0
        t0, last_eval = time.perf_counter(), None
        aside = 0.0  # seconds in evaluation and checkpoints: not training speed
        done = start
        bar = tqdm(range(start, t.steps), initial=start, total=t.steps, dynamic_ncols=True,
                   disable=not (t.progress and self.main), desc=f"{o.estimator}")
        for step in bar:
            done = step + 1
            idx = batch_indices(len(train), o.batch_size, step, t.seed)
            batch = batch_tensors(train.index(idx), self.splits.kind)
            seed = step_seed(t.seed, step)
            lr = lr_at(step, t.steps, o.lr, o.schedule, o.warmup_steps, o.min_lr_ratio)
            loss, g = self.engine.step(batch, seed, lr, o.eps)
            tokens += int(batch[1].sum()) * replicas  # real (unpadded) tokens through the model
            if loss != loss:  # NaN: stop before it reaches a checkpoint
                raise ZotuneError(f"loss became NaN at step {done}; lower optim.lr or optim.eps")
            wall = time.perf_counter() - t0
            elapsed = wall - aside
            speed = (done - start) / elapsed
            self.replay.write({"type": "step", "done": done, "step": step, "seed": seed, "lr": lr,
                               "eps": o.eps, "g": [float(x) for x in g]})
            out_of_time = t.time_limit_s is not None and self.procs.any(elapsed >= t.time_limit_s)
            last = done == t.steps or out_of_time
            if done % t.log_every == 0 or last:
                self.metrics.write({"type": "train", "done": done, "loss": loss, "lr": lr,
                                    "time": elapsed, "wall": wall, "steps_per_s": speed,
                                    "tokens_per_s": tokens / elapsed})
            t_aside = time.perf_counter()
            if done % t.eval_every == 0 or last:
                last_eval = self._eval("dev", done)
                if t.track_test:
                    self._eval("test", done, "track")
                if _score(last_eval) > best["score"]:
                    best = {"score": _score(last_eval), "done": done, "dev": _public(last_eval)}
                    self._select(done)
            if done % t.checkpoint_every == 0 or last:
                self._checkpoint(done, best)
            aside += time.perf_counter() - t_aside
            post = {"loss": f"{loss:.4f}", "it/s": f"{speed:.2f}", "tok/s": f"{tokens / elapsed:.0f}"}
            if last_eval is not None:
                post["dev"] = f"{_score(last_eval):.3f}"
            bar.set_postfix(post)
            if stop_after is not None and done >= stop_after and done < t.steps:
                self._checkpoint(done, best)
                bar.close()
                return None
            if out_of_time:
                break
        bar.close()
        return self._finish(zero_shot, best, time.perf_counter() - t0, done)

    def _zero_shot(self) -> dict:
        dev, test = self._eval("dev", 0), self._eval("test", 0)
        out = {"dev": _public(dev), "test": _public(test)}
        if self.splits.kind == "classification" and dev["logits"].shape[1] == 2:
            threshold, acc = calibrated_accuracy(dev["logits"], self.splits.dev.labels,
                                                 test["logits"], self.splits.test.labels)
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
            plot_run(self.metrics.read(), plot,
                     f"{self.cfg.optim.estimator} on {self.cfg.data.task}")
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
