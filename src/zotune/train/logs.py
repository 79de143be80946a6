"""The run's JSONL logs: metrics (loss, lr, evaluations, timing) and the replay log, whose
(step, seed, g, lr) lines describe the whole run: the adapter can be rebuilt from them alone.

Every line carries `done`, the number of updates completed when it was written, so a resumed run
cuts both logs back to its checkpoint and continues them line for line."""

from __future__ import annotations

import json
from pathlib import Path

from zotune.io import atomic_write_text

# Fields that differ between two runs of the same training (wall-clock measurements).
TIMING_FIELDS = ("time", "wall", "steps_per_s", "tokens_per_s")


class JsonlLog:
    def __init__(self, path: Path, enabled: bool = True):
        """enabled=False: a log that writes nothing (the ranks of a distributed run but rank 0)."""
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a killed run: everything after it is dropped too
        return out

    def truncate(self, done: int) -> None:
        """Keep the header and the lines written at or before `done` updates (not the final
        evaluation of a run that ended at fewer steps)."""
        if not self.enabled:
            return
        kept = [r for r in self.read() if r.get("done", 0) <= done and r.get("type") != "final"]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        if self.enabled:
            atomic_write_text(self.path, "")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
