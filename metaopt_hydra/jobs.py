"""The session's wall-clock limit from the config: `job_time_limit` (`metaopt.deadline`).

`job_time_limit: auto` (the default) is the launcher's: a submitit job (`hydra/launcher=slurm`, `submitit_local`) is
killed at `timeout_min`, so a run under it trains until its evaluations' predicted seconds are what is left, less
`LAUNCHER_START_SECONDS` for what the job did before this process's clock started; without such a launcher there
is no limit. A number or a string ("55m") sets it; null turns it off.
"""
from __future__ import annotations

from omegaconf import DictConfig

from metaopt.budget import parse_seconds
from metaopt.deadline import Deadline

__all__ = ["job_time_limit", "job_deadline", "LAUNCHER_START_SECONDS"]

LAUNCHER_START_SECONDS = 60.0
"""Seconds of a launcher's job before the run's clock starts (the interpreter, imports, Hydra's composition: 5-10 s
measured here), with room to spare; at most a quarter of a short job's timeout."""


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


def job_deadline(cfg: DictConfig, launcher: DictConfig | None, start: float) -> Deadline | None:
    """The session's `Deadline` from `start` (`time.perf_counter()` when the run began), or None without a limit."""
    seconds = job_time_limit(cfg, launcher)
    return None if seconds is None else Deadline(seconds, start=start)
