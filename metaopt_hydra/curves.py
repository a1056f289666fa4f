"""curves.png: a run's meta-train loss and validation metric against meta-step, with its timing."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: runs happen on machines without a screen
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_curves"]


def plot_curves(history: list[dict[str, Any]], path: Path, title: str, train_seconds: float | None = None) -> None:
    """Meta-train loss (left axis) and, where validation ran, the validation loss and accuracy against
    meta-step; the title carries the training wall-clock and the median seconds per meta-step."""
    steps = [h["meta_step"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(steps, [h["meta_train_loss"] for h in history], label="meta-train loss", color="C0")
    val = [(h["meta_step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="C1")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("loss")
    if all(h["meta_train_loss"] > 0 for h in history if not math.isnan(h["meta_train_loss"])) and history:
        ax.set_yscale("log")
    acc = [(h["meta_step"], 100 * h["val_accuracy"]) for h in history if "val_accuracy" in h]
    if acc:
        twin = ax.twinx()
        twin.plot(*zip(*acc), "s--", label="validation accuracy (%)", color="C2")
        twin.set_ylabel("validation accuracy (%)")
        twin.legend(loc="center right")
    per_step = [h["seconds_per_meta_step"] for h in history if not math.isnan(h.get("seconds_per_meta_step", math.nan))]
    timing = []
    if train_seconds is not None:
        timing.append(f"{train_seconds / 60:.1f} min training")
    if per_step:
        timing.append(f"{sorted(per_step)[len(per_step) // 2]:.3g} s/meta-step")
    ax.set_title(title + (f"\n{', '.join(timing)}" if timing else ""), fontsize=9)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
