"""How many threads a run computes with, set before any work.

PyTorch's default (every core) is the worst choice on a shared machine: with the two
cores of a small machine busy, a sinusoid meta-step took 0.201 s at the default vs
0.003 s with one thread. `threads: auto` is OMP_NUM_THREADS when set, else the cores
available to this process divided by the jobs a launcher runs side by side (joblib's
n_jobs; one per submitit task's cpus_per_task).
"""
from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

__all__ = ["choose_threads", "apply_threads", "available_cores"]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_threads(cfg: DictConfig, launcher: DictConfig | None = None) -> int:
    """`cfg.threads` when it is a number; for "auto" (or null) see the module docstring.

    Args:
      launcher: the Hydra launcher's config under --multirun (None for a single run).
    """
    setting = cfg.get("threads", "auto")
    if setting not in (None, "auto"):
        threads = int(setting)
        if threads < 1:
            raise ValueError(f"threads={setting}: need a positive number of threads, or auto")
        return threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = available_cores()
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if "joblib" in target.lower():
        jobs = int(launcher.get("n_jobs", -1) or -1)  # type: ignore[union-attr]
        return max(1, cores // (cores if jobs < 1 else min(jobs, cores)))
    if "submitit" in target.lower():
        return max(1, int(launcher.get("cpus_per_task", 1) or 1))  # type: ignore[union-attr]
    return cores


def apply_threads(threads: int) -> None:
    """Set torch's intra-op threads (and inter-op threads where the process has not started them yet)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass
