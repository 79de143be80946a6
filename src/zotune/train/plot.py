"""A PNG of the training loss and dev accuracy of a run, from its metrics log."""

from __future__ import annotations

import io
from pathlib import Path

from zotune.io import atomic_write_bytes


def plot_run(records: list[dict], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and r.get("split") == "dev"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps = [r["done"] for r in train]
        losses = [r["loss"] for r in train]
        window = max(1, len(losses) // 25)  # running mean: ZO losses are noisy step to step
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(steps, smooth, color="tab:blue", label="train loss (running mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    metric = next((k for k in ("accuracy", "loss") if evals and k in evals[0]), None)
    if metric:
        ax2 = ax.twinx()
        ax2.plot(
            [r["done"] for r in evals],
            [r[metric] for r in evals],
            "o-",
            color="tab:orange",
            label=f"dev {metric}",
        )
        ax2.set_ylabel(f"dev {metric}")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(out, png.getvalue())
    return out
