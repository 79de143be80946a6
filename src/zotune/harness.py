"""lm-evaluation-harness on a zotune adapter, in-process: lm-eval's Hugging Face model with the PEFT
folder zotune writes (`--model hf --model_args pretrained=<base>,peft=<adapter>`), no conversion.

Task names are checked against lm-eval's task index (plus --harness-include folders of YAML tasks)
before anything runs, so an unknown name is an error naming it, with close matches.
"""

from __future__ import annotations

import difflib

from zotune.config import Config
from zotune.errors import ZotuneError


def run_harness(
    cfg: Config, adapter: str | None, tasks: str, include: list[str] | None = None, limit: int | None = None
) -> dict:
    """-> {task: {metric: value}} from lm_eval.simple_evaluate."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ZotuneError("--harness needs lm-evaluation-harness (pip install lm-eval==0.4.13)") from None
    from zotune.models import resolve

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ZotuneError("--harness: expected a comma-separated list of task names")
    manager = TaskManager(include_path=include or None)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ZotuneError(
                f"--harness: task '{name}' does not exist in lm-eval's task index"
                f"{' or ' + ', '.join(include) if include else ''}{hint}"
            )
    source = resolve(cfg.model.name)
    if source.kind == "hub":
        raise ZotuneError(f"--harness: model '{cfg.model.name}' must be a local model")
    args = {"pretrained": source.path, "dtype": cfg.model.dtype}
    if adapter:
        args["peft"] = adapter
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=args,
        tasks=names,
        task_manager=manager,
        batch_size=cfg.train.eval_batch_size,
        device="cpu",
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
        for task, metrics in out["results"].items()
    }
