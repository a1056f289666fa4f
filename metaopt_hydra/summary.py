"""One table for any multirun (or explore) directory: every run, its overrides, status, metrics and error.

A run is a folder with a `metrics.json` (any depth below the directory); its overrides come
from Hydra's `.hydra/overrides.yaml` beside it. A run without metrics.json but with a
`.hydra` folder is listed as "running" while its process lives (`metaopt_hydra.liveness`), else as "missing" (it
died before writing one, e.g. killed). Failed runs
are listed with their error, never mislabelled, and never crash the summary. A folder with only a
`dry_run.json` (`dry_run=true`: a sweep priced before it is submitted) is listed as "planned" with its
predicted seconds and peak, and `dry_run_totals` sums the sweep's price.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from metaopt_hydra.liveness import running_record
from metaopt_hydra.threads import available_cores

__all__ = ["collect_runs", "markdown_table", "write_csv", "dry_run_totals", "duration", "launcher_parallelism",
           "over_seeds", "METRICS", "SEED_METRICS"]

METRICS = ("meta_test_loss", "meta_test_loss_ci95", "test_accuracy", "test_accuracy_ci95", "val_loss",
           "learned", "baseline", "difference", "estimator_chosen", "meta_steps", "stopped_by", "train_seconds",
           "job_seconds", "predicted_run_seconds", "meta_steps_within_job_limit", "predicted_peak_bytes",
           "measured_peak_bytes", "threads")


def _overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        return " ".join(str(o) for o in (yaml.safe_load(path.read_text()) or []))
    except (OSError, yaml.YAMLError):
        return ""


def collect_runs(root: Path) -> list[dict[str, Any]]:
    """One row per run under `root` (sorted by path): run, overrides, status, error, `METRICS`, and the whole
    metrics.json under "_metrics" (for table scripts; not a column)."""
    dirs = {p.parent for name in ("metrics.json", "dry_run.json") for p in root.rglob(name)} | \
        {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    rows = []
    for run_dir in sorted(dirs, key=lambda d: [int(x) if x.isdigit() else x for x in d.relative_to(root).parts]):
        if any(part in ("baselines", "best") or re.fullmatch(r"member\d+", part)
               for part in run_dir.relative_to(root).parts):
            continue  # a comparison's baselines, the explorer's exported configs, an ensemble's members: their run's
        row: dict[str, Any] = {"run": str(run_dir.relative_to(root)) or ".", "overrides": _overrides(run_dir)}
        metrics = _record(run_dir)
        row["_metrics"] = metrics  # everything, for table scripts (not a column)
        row["status"] = metrics.get("status", "unknown")
        row["error"] = metrics.get("error", "")
        row.update({k: metrics[k] for k in METRICS if metrics.get(k) is not None})  # None: blank
        for name, scores in (metrics.get("protocols") or {}).items():  # eval.protocols: one column each
            score = scores.get("test_accuracy", scores.get("meta_test_loss"))
            if score is not None:
                row[f"{name}_{'accuracy' if 'test_accuracy' in scores else 'loss'}"] = score
        rows.append(row)
    return rows


def _record(run_dir: Path) -> dict[str, Any]:
    """A running run's record (`liveness.running_record`: its process lives, or is on another host), else the run's
    metrics.json, else its dry run's record (`dry_run.json`: status "planned" or "failed"), else a "missing" record
    (with where its process ran, where it left a `running.json`)."""
    live = running_record(run_dir)
    if live is not None and live["status"] != "missing":
        return live  # a resumed run's metrics.json is an earlier session's
    for name in ("metrics.json", "dry_run.json"):
        try:
            return json.loads((run_dir / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, json.JSONDecodeError) as error:
            return {"status": "unreadable", "error": f"{name}: {error}"}
    return live or {"status": "missing", "error": "no metrics.json (the run died before writing one)"}


def launcher_parallelism(run_dir: Path) -> int:
    """How many of a sweep's jobs its launcher runs at once, read from a job's `.hydra/hydra.yaml`: joblib's
    `n_jobs` (-1 or null: the cores), submitit's `array_parallelism`; 1 for Hydra's basic launcher, which runs them
    in turn, and wherever it cannot be read."""
    try:
        launcher = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["launcher"]
        target = str(launcher.get("_target_", "")).lower()
        if "joblib" in target:
            n_jobs = launcher.get("n_jobs")
            return available_cores() if n_jobs in (None, -1) else max(int(n_jobs), 1)
        if "submitit" in target:
            return max(int(launcher.get("array_parallelism") or 1), 1)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError):
        pass
    return 1


def duration(seconds: float) -> str:
    """Seconds as a person reads them: "45 s", "12.5 min", "3.2 h"."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.3g} min" if seconds < 7200 else f"{seconds / 3600:.3g} h"


def _makespan(seconds: list[float], slots: int) -> float:
    """The wall clock of jobs of `seconds` on `slots` at a time, longest first, each to the slot free first."""
    loads = [0.0] * max(min(slots, len(seconds)), 1)
    for job in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += job
    return max(loads)


def dry_run_totals(rows: list[dict[str, Any]], parallel: int = 1) -> str | None:
    """A sweep's price from its dry runs' rows ("planned"): the runs, their predicted seconds in all and the
    longest (approximate, each priced alone), the wall clock with `parallel` jobs at a time (the launcher's:
    `launcher_parallelism`; a cluster's queue can only add to it), the largest predicted peak, and how many fit
    their job_time_limit; None where no row is planned."""
    planned = [r["_metrics"] for r in rows if r["status"] == "planned"]
    if not planned:
        return None
    seconds = [float(m["predicted_run_seconds"]) for m in planned]
    peak = max(float(m["predicted_peak_bytes"]) for m in planned)
    line = (f"priced by dry runs: {len(planned)} run(s), {duration(sum(seconds))} predicted in all, the longest "
            f"{duration(max(seconds))}, the largest predicted peak {peak / 1e6:.4g} MB")
    if parallel > 1:
        line += f"; {parallel} at a time (the launcher's): about {duration(_makespan(seconds, parallel))}"
    limited = [m for m in planned if "job_time_limit" in m]
    if limited:
        fit = sum(float(m["predicted_run_seconds"]) <= float(m["job_time_limit"]) for m in limited)
        line += f"; {fit} of {len(limited)} within their job_time_limit"
    return line


SEED_METRICS = ("meta_test_loss", "test_accuracy", "train_seconds")


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4g} (one run)"
    return f"{mean:.4g} ± {math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)):.2g}"


def over_seeds(rows: list[dict[str, Any]]) -> str | None:
    """Lines (plain text, not table rows: a sweep's table keeps one row per run) on the runs that differ only in
    `seed=`, one per such group: its overrides less the seed, the seeds, how many ended ok, and the mean ± standard
    deviation over those (n - 1) of `SEED_METRICS`; None where no group has two seeds (a single run is no spread)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        tokens = str(row["overrides"]).split(" ")
        if any(t.startswith("seed=") for t in tokens):
            groups.setdefault(" ".join(t for t in tokens if not t.startswith("seed=")), []).append(row)
    lines = []
    for overrides, members in groups.items():
        if len(members) < 2:
            continue
        ok = [m for m in members if m["status"] == "ok"]
        seeds = ",".join(t.removeprefix("seed=") for m in members for t in str(m["overrides"]).split(" ")
                         if t.startswith("seed="))
        figures = [f"{k} {_mean_std([float(m[k]) for m in ok])}" for k in SEED_METRICS
                   if ok and all(k in m for m in ok)]
        lines.append(f"  {overrides or '(no other override)'}: seeds {seeds} ({len(ok)} of {len(members)} ended ok)"
                     + (": " + ", ".join(figures) if figures else ""))
    return "\n".join(lines) or None


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    fixed = {"run", "overrides", "status", "error", "_metrics", *METRICS}
    protocols = sorted({k for r in rows for k in r if k not in fixed})
    return ["run", "overrides", "status"] + [k for k in METRICS if any(k in r for r in rows)] + protocols + ["error"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (missing values blank)."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows as CSV (same columns as the table)."""
    columns = _columns(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
