"""The worker process of one explorer trial: train rung by rung, report each rung, wait to be told to go on.

Runs in its own process (spawned), so a misprediction or a crash hurts only its trial.
Pausing is free: between rungs the trial's state is in its checkpoint and in memory, and
the next rung resumes it (`metaopt_hydra.build.train_from_config` resumes from the run
directory's checkpoint).
"""
from __future__ import annotations

from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from metaopt.budget import BudgetExceeded
from metaopt.explore.scheduler import Rung
from metaopt_hydra.build import build, train_from_config, validation
from metaopt_hydra.records import failure_record, resolved, write_json_atomic

__all__ = ["trial_worker", "worker_main"]


def _rung(cfg: Any, parts: Any, run_dir: Path, index: int, steps: int) -> tuple[Rung, dict[str, Any]]:
    cfg.meta_steps = steps
    metrics = train_from_config(cfg, parts, run_dir, evaluate=False, checkpoint_extra={"config": resolved(cfg)})
    validate = validation(cfg, parts)
    val = validate(parts.meta) if validate is not None else {"val_loss": metrics["meta_train_loss"]}
    metrics.update(val, status="ok", config=resolved(cfg), rung=index)
    write_json_atomic(metrics, run_dir / "metrics.json")
    return Rung(index, steps, float(val["val_loss"]), float(metrics["train_seconds"]),
                int(metrics["measured_peak_bytes"])), metrics


def worker_main(conn: Connection, threads: int) -> None:
    """A worker process: runs the trials it is sent, one after another, until told "exit" (or its pipe closes).
    Reusing it saves the interpreter start and imports (seconds) per trial."""
    torch.set_num_threads(threads)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job == "exit":
            return
        if isinstance(job, tuple):  # a stale "stop"/"continue" for a finished trial is ignored
            config_yaml, run_dir, rung_steps = job
            trial_worker(config_yaml, run_dir, rung_steps, conn)


def trial_worker(config_yaml: str, run_dir: str, rung_steps: list[int], conn: Connection) -> None:
    """Run the trial's rungs in `run_dir`; send ("rung", Rung) after each, ("done",) after the last, or
    ("error", message, caught_by_budget_guard) and stop; between rungs wait for "continue" (anything else stops)."""
    cfg = cast(DictConfig, OmegaConf.create(config_yaml))
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    try:
        parts = build(cfg)
        for index, steps in enumerate(rung_steps):
            rung, _ = _rung(cfg, parts, path, index, steps)
            conn.send(("rung", rung))
            if index + 1 == len(rung_steps):
                conn.send(("done",))
                return
            if conn.recv() != "continue":
                return
    except BudgetExceeded as error:
        write_json_atomic(failure_record(cfg, error), path / "metrics.json")
        conn.send(("error", f"BudgetExceeded: {error}", True))
    except Exception as error:  # the trial's failure, recorded; the explorer goes on
        write_json_atomic(failure_record(cfg, error), path / "metrics.json")
        conn.send(("error", f"{type(error).__name__}: {error}", False))
