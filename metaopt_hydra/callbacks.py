"""Hydra callbacks for sweeps: every failed job is reported with its error, not only the first."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from metaopt_hydra.summary import collect_runs

__all__ = ["ReportFailures"]


class ReportFailures(Callback):
    """Prints each failed job (its number, overrides and error) when it ends, and the list at the sweep's end."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or config.hydra.mode != RunMode.MULTIRUN:
            return  # a single run's error is Hydra's own last words
        error = job_return._return_value  # the exception the task function raised
        line = (f"job {config.hydra.job.get('num', '?')} ({' '.join(job_return.overrides or [])}) failed: "
                f"{type(error).__name__}: {error}")
        self.failed.append(line)
        print(f"[metaopt] {line}", file=sys.stderr, flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Every job of the sweep whose metrics.json is not "ok" (jobs may have run in other processes)."""
        runs = [run for run in collect_runs(Path(config.hydra.sweep.dir)) if run["status"] != "ok"]
        if runs:
            lines = [f"{run['run']} ({run['overrides']}): {run['status']}: {run.get('error', '')}" for run in runs]
            print(f"[metaopt] {len(runs)} job(s) did not finish ok:\n  " + "\n  ".join(lines), file=sys.stderr,
                  flush=True)
