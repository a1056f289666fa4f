"""Experiment loggers, built from `logger._target_` (conf/logger/*.yaml).

A logger is started once per run with the run's id (kept in the checkpoint, so a
resumed run continues the same logged run), logs history entries by meta-step,
uploads files (metrics.json, curves.png) and finishes with the run's exit code
(non-zero when it failed or was interrupted).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Protocol

__all__ = ["RunLogger", "NullLogger", "WandbLogger", "new_run_id"]


def new_run_id() -> str:
    """A fresh id for a logged run (8 hex digits, like wandb's)."""
    return uuid.uuid4().hex[:8]


class RunLogger(Protocol):
    def start(self, run_dir: Path, config: dict[str, Any], run_id: str, group: str | None) -> None: ...

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def artifact(self, path: Path) -> None: ...

    def finish(self, exit_code: int) -> None: ...


class NullLogger:
    """Logs nothing (`logger=none`)."""

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str, group: str | None) -> None:
        pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def artifact(self, path: Path) -> None:
        pass

    def finish(self, exit_code: int) -> None:
        pass


class WandbLogger:
    """Weights & Biases (`logger=wandb`; needs `pip install 'metaopt[wandb]'`).

    Offline by default: nothing waits for a server. WANDB_MODE in the environment (e.g.
    disabled in the tests) takes precedence over `mode`. A resumed run continues its wandb
    run (same id, resume="allow"); a sweep's runs share one group (the sweep directory).

    Args:
      project, entity, tags: as in `wandb.init`.
      mode: "offline" | "online" | "disabled".
      group: the group (None: the sweep directory under a multirun, else no group).
    """

    def __init__(self, project: str = "metaopt", entity: str | None = None, mode: str = "offline",
                 tags: tuple[str, ...] | list[str] = (), group: str | None = None):
        try:
            import wandb
        except ImportError:
            raise ImportError("logger=wandb needs wandb: pip install 'metaopt[wandb]'") from None
        self._wandb = wandb
        self.project, self.entity, self.mode, self.tags, self.group = project, entity, mode, list(tags), group
        self.run: Any = None

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str, group: str | None) -> None:
        self.run = self._wandb.init(project=self.project, entity=self.entity, dir=str(run_dir), tags=self.tags,
                                    mode=os.environ.get("WANDB_MODE", self.mode), config=config, id=run_id,
                                    resume="allow", group=self.group or group)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def artifact(self, path: Path) -> None:
        if self.run is not None and path.exists():
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, exit_code: int) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
