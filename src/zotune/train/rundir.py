"""The run folder is a contract: checked before any model or data loads.

- `train.out_dir` must be a folder zotune can write (or a path where one can be made).
- A new run goes into an empty or absent folder; a folder holding anything is continued with
  `--resume` or replaced with `--overwrite`, never silently.
- `--resume` continues the run the checkpoint describes: every checkpoint stores the resolved
  config, and a config that would change the trajectory (model, data, adapter, optimiser, seeds,
  schedule, evaluation points) is refused, listing the keys. Fields declared `resumable` in
  config.py (threads, progress bar, logging, checkpoint interval, time limit, eval batch size,
  parallel mode) may change; so may train.steps under a constant schedule (the steps done do not
  depend on it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import yaml

from zotune.config import Config
from zotune.errors import ConfigError, ZotuneError, reading
from zotune.io import committed_dir

# What a finished run leaves that a new run in the same folder does not rewrite before it ends.
STALE_OUTPUTS = ("adapter", "adapter.old", "summary.json", "training.png", "distributed.json")
SECTIONS = ("model", "data", "adapter", "optim", "train")  # what `zotune train` reads


def check_run_dir(cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything loads, a run folder this run cannot use."""
    out = Path(cfg.train.out_dir)
    check_writable(out)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir and --overwrite replaces it: pick one")
    if resume:
        changed = trajectory_changes(stored_config(out), cfg)
        if changed:
            raise ConfigError(
                f"{out}: --resume with a config that changes the run's trajectory: "
                + "; ".join(changed)
                + ". Resume with the run's values, or start a new run (another train.out_dir, or --overwrite)"
            )
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a finished run" if (out / "summary.json").is_file() else "a run, or other files"
        raise ConfigError(
            f"train.out_dir {out} is not empty (it holds {what}): continue it with --resume, "
            "replace it with --overwrite, or choose another train.out_dir"
        )


def check_writable(out: Path) -> None:
    """out is a folder, or can be made one, and files can be created in it (probed, nothing left)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir {out} is a file, not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"train.out_dir {out}: {existing} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".zotune-probe.", dir=existing)).rmdir()
    except OSError as e:
        raise ConfigError(f"train.out_dir {out}: cannot write in {existing} ({e.strerror})") from None


def stored_config(run: Path) -> dict:
    """The resolved config of the run in `run`: the checkpoint's, else the run's config.yaml."""
    meta_path = committed_dir(run / "checkpoint") / "meta.json"
    if not meta_path.is_file():
        where = run / "checkpoint" / "meta.json"
        raise ZotuneError(f"--resume: {run} holds no checkpoint ({where}); start the run without --resume")
    with reading(meta_path, "a zotune checkpoint's meta.json (a JSON object)"):
        meta = json.loads(meta_path.read_text())
    if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return meta["config"]
    config_path = run / "config.yaml"
    with reading(config_path, "the run's resolved config (a YAML mapping)"):
        stored = yaml.safe_load(config_path.read_text())
    if not isinstance(stored, dict):
        raise ConfigError(f"{config_path}: expected the run's resolved config (a YAML mapping)")
    return stored


def trajectory_changes(stored: dict, cfg: Config) -> list[str]:
    """'section.key: run has X, now Y' for every field that would change the trajectory."""
    if not isinstance(stored, dict):
        stored = {}
    now, defaults = cfg.to_dict(), Config().to_dict()
    constant = stored.get("optim", {}).get("schedule", "constant") == cfg.optim.schedule == "constant"
    changes = []
    for section in dataclasses.fields(Config):
        if section.name not in SECTIONS:
            continue
        old = stored.get(section.name)
        old = old if isinstance(old, dict) else {}
        for f in dataclasses.fields(section.default_factory):
            if f.metadata["resumable"] or (f"{section.name}.{f.name}" == "train.steps" and constant):
                continue
            was = old.get(f.name, defaults[section.name][f.name])
            if was != now[section.name][f.name]:
                changes.append(f"{section.name}.{f.name}: run has {was!r}, now {now[section.name][f.name]!r}")
    return changes


def clear_stale_outputs(run: Path) -> None:
    """A new run in a folder it may replace (--overwrite): what the old run finished with goes."""
    for name in STALE_OUTPUTS:
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
