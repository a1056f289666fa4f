"""The session's wall-clock limit from the config: `job_time_limit` (`metaopt.deadline`).

`job_time_limit: auto` (the default) is the launcher's: a submitit job (`hydra/launcher=slurm`, `submitit_local`) is
killed at `timeout_min`, so a run under it trains until its evaluations' predicted seconds are what is left, less
`LAUNCHER_START_SECONDS` for what the job did before this process's clock started; without such a launcher there
is no limit. A number or a string ("55m") sets it; null turns it off.

A job can also be stopped from outside: a scheduler's preemption or `scancel`, a `kill`, all send SIGTERM (SLURM
sends SIGKILL some seconds later). `terminated_as_interrupted` turns SIGTERM into `JobTerminated`, a
KeyboardInterrupt, so it is handled as Ctrl-C is: the training loop checkpoints the last completed meta-step and
the run writes `metrics.json` with status "interrupted" (without it, the process died with no record and the
checkpoint of up to `checkpoint_every` meta-steps before).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator

from omegaconf import DictConfig

from metaopt.budget import parse_seconds
from metaopt.deadline import Deadline
from metaopt_hydra.liveness import start_ticks

__all__ = ["job_time_limit", "job_deadline", "job_started", "process_age", "terminated_as_interrupted", "JobTerminated",
           "LAUNCHER_START_SECONDS", "END_SECONDS"]

LAUNCHER_START_SECONDS = 60.0
"""Seconds of a launcher's job before the run's clock starts (the interpreter, imports, Hydra's composition: 5-10 s
measured here), with room to spare; at most a quarter of a short job's timeout."""

END_SECONDS = 2.0
"""Seconds kept, as they are (no margin), for the job's end: writing the last checkpoint, metrics.json and curves.png
(0.1-1 s measured here), and a last meta-step slower than the median the loop stops by. An allowance, not a
prediction."""


def job_time_limit(cfg: DictConfig, launcher: DictConfig | None = None) -> float | None:
    """The session's wall-clock limit in seconds (None: none); see the module docstring.

    Args:
      launcher: the Hydra launcher's config under --multirun (None for a single run).

    Raises:
      ValueError: a `job_time_limit` that is not a positive duration, "auto" or null.
    """
    setting = cfg.get("job_time_limit", "auto")
    if setting is None:
        return None
    if setting != "auto":
        return parse_seconds(setting)
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    timeout = launcher.get("timeout_min") if launcher is not None and "submitit" in target.lower() else None
    if not timeout:
        return None
    seconds = float(timeout) * 60.0
    return seconds - min(LAUNCHER_START_SECONDS, seconds / 4)


def process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0.0, i.e. from the first call). The job's
    clock includes the interpreter's start, the imports and Hydra's composition before the run's own code."""
    started_ticks = start_ticks()
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return 0.0 if started_ticks is None else max(uptime - started_ticks / os.sysconf("SC_CLK_TCK"), 0.0)


_jobs_started = 0  # jobs this process has started (`job_started`)


def job_started() -> float:
    """The `time.perf_counter()` at which this job's wall clock started; call it once, as the job starts. A
    process's first job started with the process (`process_age`: the interpreter, the imports and Hydra's
    composition count); a later one in the same process starts now (Hydra's basic launcher runs a sweep's jobs in
    turn in one process, and joblib reuses its workers: their clocks had counted every job before them)."""
    global _jobs_started
    _jobs_started += 1
    now = time.perf_counter()
    return now - process_age() if _jobs_started == 1 else now


def job_deadline(cfg: DictConfig, launcher: DictConfig | None, start: float | None = None) -> Deadline | None:
    """The session's `Deadline`, its clock started at `start` (`job_started()`; default: when this process
    started, `process_age`), or None without a limit. `END_SECONDS` are kept for the job's end (the record and the
    plot) beside what evaluation reserves."""
    seconds = job_time_limit(cfg, launcher)
    if seconds is None:
        return None
    deadline = Deadline(seconds, start=time.perf_counter() - process_age() if start is None else start)
    deadline.keep("the job's end (checkpoint, metrics.json, curves.png; a last meta-step slower than the median)",
                  END_SECONDS)
    return deadline


class JobTerminated(KeyboardInterrupt):
    """SIGTERM received (preemption, cancellation, `kill`): handled as Ctrl-C is (`terminated_as_interrupted`)."""


@contextlib.contextmanager
def terminated_as_interrupted() -> Iterator[None]:
    """Within the block, SIGTERM raises `JobTerminated` in the main thread (elsewhere signals cannot be handled:
    nothing changes); the previous handler is restored after it (a launcher's own, e.g. submitit's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise JobTerminated(f"{signal.Signals(signum).name}: the job was told to stop (preempted, cancelled or "
                            "killed); the last completed meta-step is checkpointed")
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
