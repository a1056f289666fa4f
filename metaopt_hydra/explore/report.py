"""What an explorer leaves: pareto.csv, front.md, pareto.png, and best/<name>.yaml per front member."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from metaopt.explore.pareto import pareto_front  # noqa: E402
from metaopt.explore.scheduler import (  # noqa: E402
    CUT,
    NOT_STARTED_LATE,
    STOPPED_BEFORE_LATE_RUNG,
    RungPrice,
    TrialRecord,
)

__all__ = ["write_report", "COLUMNS", "front_of", "time_summary", "rung_price_summary"]

COLUMNS = ["trial", "status", "estimator_chosen", "predicted_peak_bytes", "measured_peak_bytes", "train_seconds",
           "val_loss", "pareto"]  # (the contract's first columns; the seconds per meta-step come last)
LAST_COLUMNS = ["meta_steps", "parent", "error", "predicted_step_seconds", "measured_step_seconds"]


def front_of(records: list[TrialRecord]) -> list[TrialRecord]:
    """Front members among trials with a result: (validation loss, training seconds, peak bytes), see
    `TrialRecord.objectives`."""
    scored = [r for r in records if r.rungs and math.isfinite(r.val_loss)]
    return [scored[i] for i in pareto_front([r.objectives() for r in scored])]


def _row(record: TrialRecord, front: set[int], params: list[str]) -> dict[str, Any]:
    return {"trial": record.trial, "status": record.status, "estimator_chosen": record.estimator_chosen,
            "predicted_peak_bytes": record.predicted_peak_bytes, "measured_peak_bytes": record.measured_peak_bytes,
            "predicted_step_seconds": "" if record.predicted_step_seconds is None else
            f"{record.predicted_step_seconds:.4g}",
            "measured_step_seconds": "" if math.isnan(record.measured_step_seconds) else
            f"{record.measured_step_seconds:.4g}",
            "train_seconds": "" if math.isnan(record.train_seconds) else round(record.train_seconds, 3),
            "val_loss": "" if math.isnan(record.val_loss) else record.val_loss,
            "pareto": int(record.trial in front), **{p: record.params.get(p, "") for p in params},
            "meta_steps": record.rungs[-1].meta_steps if record.rungs else 0, "parent": record.parent,
            "error": record.error}


def time_summary(records: list[TrialRecord]) -> str:
    """One line on the explorer's time predictions: measured / predicted seconds per meta-step over the trials that
    ran (the prediction before calibration; the median is what the explorer scaled it by), how many of them the
    median puts within 1.25x, and what the deadline rule did (trials cut before their first rung, candidates not
    started, trials stopped at a rung because the next would end past the deadline)."""
    ratios = sorted(r.measured_step_seconds / r.predicted_step_seconds for r in records
                    if r.rungs and r.predicted_step_seconds and r.measured_step_seconds > 0)

    def count(words: str) -> int:
        return sum(words in r.error for r in records)
    deadline = (f"first rungs cut by the deadline: {count(CUT)}; "
                f"not started, their first rung predicted past it: {count(NOT_STARTED_LATE)}; "
                f"stopped at a rung, the next predicted past it: {count(STOPPED_BEFORE_LATE_RUNG)}")
    if not ratios:
        return f"seconds per meta-step: no trial with a prediction ran; {deadline}"
    median = statistics.median(ratios)
    within = sum(1 / 1.25 <= ratio / median <= 1.25 for ratio in ratios)
    spread = f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if len(ratios) > 1 else ""
    return (f"seconds per meta-step, measured / predicted at admission: median {median:.2f} ({spread}) over "
            f"{len(ratios)} trial(s); scaled by the median, {within} of {len(ratios)} within 1.25x; {deadline}")


def rung_price_summary(prices: list[RungPrice]) -> str:
    """One line on the explorer's price of a rung (wall clock, from a trial's start or resumption: its build, planning,
    training, validation and checkpoint): measured / predicted seconds, median (range) and how many within 1.25x,
    for first rungs (priced at admission) and later ones (priced at the rung before, with the trial's own
    measured seconds per meta-step and validation)."""
    parts = []
    for first, name in ((True, "first rungs"), (False, "later rungs")):
        ratios = sorted(p.measured_seconds / p.predicted_seconds for p in prices
                        if p.first == first and p.predicted_seconds > 0)
        if not ratios:
            parts.append(f"{name}: none priced")
            continue
        within = sum(1 / 1.25 <= r <= 1.25 for r in ratios)
        parts.append(f"{name} median {statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) over "
                     f"{len(ratios)}, {within} within 1.25x")
    return "seconds to a rung, measured / predicted: " + "; ".join(parts)


def _megabytes(value: int) -> str:
    return f"{value / 1e6:.3g} MB" if value > 0 else "—"


def _plot(records: list[TrialRecord], front: set[int], path: Path) -> None:
    scored = [r for r in records if r.rungs and math.isfinite(r.val_loss)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, x, label in ((axes[0], lambda r: r.train_seconds, "training seconds"),
                         (axes[1], lambda r: r.peak_bytes / 1e6, "peak memory (MB): predicted, or measured if higher")):
        others = [r for r in scored if r.trial not in front]
        members = sorted((r for r in scored if r.trial in front), key=x)
        ax.scatter([x(r) for r in others], [r.val_loss for r in others], c="0.6", s=18, label="dominated")
        ax.scatter([x(r) for r in members], [r.val_loss for r in members], c="C3", s=30, label="Pareto front")
        for r in members:
            ax.annotate(str(r.trial), (x(r), r.val_loss), fontsize=7)
        ax.set_xlabel(label)
        if scored:  # log axes need positive data; with none, an empty plot that says so
            ax.set_xscale("log")
    axes[0].set_ylabel("validation loss")
    if scored and all(r.val_loss > 0 for r in scored):
        axes[0].set_yscale("log")
    if not scored:
        axes[0].text(0.5, 0.5, "no trial reached its first rung", ha="center", transform=axes[0].transAxes)
    axes[0].legend(fontsize=8)
    fig.suptitle("explorer trials (front: validation loss x time x memory)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(records: list[TrialRecord], run_dir: Path, params: list[str], configs: dict[int, str | None]) -> str:
    """Write the files; return the front's Markdown table. `configs`: trial -> its resolved config YAML."""
    front = {r.trial for r in front_of(records)}
    rows = [_row(r, front, params) for r in sorted(records, key=lambda r: r.trial)]
    with open(run_dir / "pareto.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + params + LAST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = ["| trial | estimator chosen | val_loss | train seconds | s per meta-step (predicted / measured) "
             "| predicted peak | measured peak | meta-steps | " + " | ".join(params) + " |",
             "|---" * (8 + len(params)) + "|"]
    for row in sorted((r for r in rows if r["pareto"]), key=lambda r: r["val_loss"]):
        table.append(f"| {row['trial']} | {row['estimator_chosen']} | {row['val_loss']:.4g} | {row['train_seconds']} "
                     f"| {row['predicted_step_seconds'] or '—'} / {row['measured_step_seconds'] or '—'} "
                     f"| {row['predicted_peak_bytes'] / 1e6:.3g} MB | {_megabytes(row['measured_peak_bytes'])} "
                     f"| {row['meta_steps']} | "
                     + " | ".join(str(row[p]) for p in params) + " |")
    (run_dir / "front.md").write_text("\n".join(table) + "\n")
    _plot(records, front, run_dir / "pareto.png")
    best = run_dir / "best"
    best.mkdir(exist_ok=True)
    for record in records:
        config = configs.get(record.trial)
        if record.trial in front and config:
            cfg = yaml.safe_load(config)
            cfg["meta_steps"] = record.rungs[-1].meta_steps
            (best / f"trial_{record.trial}.yaml").write_text(
                f"# explorer trial {record.trial}: val_loss {record.val_loss:.4g}, {record.train_seconds:.1f} s, "
                f"predicted peak {record.predicted_peak_bytes} bytes, measured {record.measured_peak_bytes}\n"
                f"# python experiments/train.py --config-dir {best} --config-name trial_{record.trial}\n"
                + yaml.safe_dump(cfg, sort_keys=False))
    return "\n".join(table)
