"""What a run leaves behind: metrics.json (atomic), failure records, and the config a checkpoint must match.

A run's status is one of "ok", "failed" (any error, including while building the run,
a non-finite final metric, or every task skipped) and "interrupted" (Ctrl-C / SIGTERM).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["write_json_atomic", "failure_record", "resolved", "changed_keys", "ResumeMismatch",
           "RESUMABLE_KEYS", "check_outcome"]

RESUMABLE_KEYS = ("meta_steps", "time_limit", "job_time_limit", "progress", "log_every", "checkpoint_every", "logger",
                  "threads", "eval", "resume", "objective", "compare", "data", "dry_run")
"""Top-level keys that may change when a run resumes: how long, how it reports, how it is evaluated (and whether it
is only priced: a dry run reads a checkpoint as the run would);
everything else defines the training trajectory and must match the checkpoint's config."""


class ResumeMismatch(ValueError):
    """A run directory's checkpoint was made with another configuration (`changed`: the dotted keys)."""

    def __init__(self, message: str, changed: list[str] | None = None):
        super().__init__(message)
        self.changed = list(changed or [])


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write JSON through a temporary file and `os.replace`, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain, resolved data (interpolations filled in)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def checkpoint_changes(cfg: DictConfig, checkpoint: dict[str, Any], run_dir: Path) -> ResumeMismatch | None:
    """Why `checkpoint` (a run directory's, loaded) cannot resume under `cfg`: the refusal naming the keys that
    changed outside `RESUMABLE_KEYS`, or None where it can."""
    before = checkpoint.get("config")
    changed = changed_keys(before, resolved(cfg)) if before is not None else ["(no config in the checkpoint)"]
    if not changed:
        return None
    return ResumeMismatch(f"{run_dir} holds a checkpoint made with another config; changed: {', '.join(changed)}. "
                          f"Use another hydra.run.dir, or resume=fresh to start over in this one", changed)


def changed_keys(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (or exist on one side only), outside `RESUMABLE_KEYS`."""
    a, b = _flatten(before), _flatten(now)
    return sorted(k for k in set(a) | set(b)
                  if k.split(".")[0] not in RESUMABLE_KEYS and a.get(k, "<absent>") != b.get(k, "<absent>"))


def failure_record(cfg: DictConfig | None, error: BaseException, status: str = "failed") -> dict[str, Any]:
    """The metrics.json of a run that did not finish: its status, the error, and what was asked for."""
    record: dict[str, Any] = {"status": status, "error": f"{type(error).__name__}: {error}"}
    if cfg is not None:
        try:
            record["config"] = resolved(cfg)
            record.update(estimator=cfg.estimator.get("_target_", "?").rsplit(".", 1)[-1].lower(),
                          meta_steps=cfg.get("meta_steps"))
        except Exception as unresolvable:  # e.g. the broken value is what failed
            record["config_error"] = f"{type(unresolvable).__name__}: {unresolvable}"
            record["config"] = OmegaConf.to_container(cfg, resolve=False)
    return record


def check_outcome(metrics: dict[str, Any]) -> str | None:
    """Why a finished run counts as failed (a non-finite final metric, or every task skipped), or None."""
    loss = metrics.get("meta_test_loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        return f"meta_test_loss is {loss}: the meta-learned model diverged or every task was dropped"
    skipped = metrics.get("tasks_skipped", 0) + metrics.get("tasks_nan_skipped", 0)
    total = metrics.get("meta_steps", 0) * metrics.get("meta_batch_size", 0)
    if total and skipped >= total:
        return f"all {total} meta-training tasks were skipped (budget or non-finite values): nothing was learned"
    return None
