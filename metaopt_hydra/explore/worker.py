"""The worker process of one explorer trial: train rung by rung, report each rung, wait to be told to go on.

Runs in its own process (spawned), so a misprediction or a crash hurts only its trial.
Pausing is free: between rungs the trial's state is in its checkpoint and in memory, and
the next rung resumes it (`metaopt_hydra.build.train_from_config` resumes from the run
directory's checkpoint). Each trial is one logged run of the trial config's `logger`
(`explore.logger=wandb`: one wandb run per trial, grouped by study), whose id the trial's
checkpoint keeps, so a resumed study continues it.
"""
from __future__ import annotations

import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, cast

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaopt.allocator import set_allocator
from metaopt.budget import BudgetExceeded
from metaopt.checkpoint import load_checkpoint
from metaopt.explore.scheduler import Rung
from metaopt_hydra.build import build, train_from_config, validation
from metaopt_hydra.loggers import NullLogger, RunLogger, new_run_id
from metaopt_hydra.records import failure_record, resolved, write_json_atomic

__all__ = ["trial_worker", "worker_main"]


def _rung(cfg: Any, parts: Any, run_dir: Path, index: int, steps: int, logger: RunLogger,
          run_id: str, validate: Callable[[Any], dict[str, float]] | None) -> tuple[Rung, dict[str, Any]]:
    cfg.meta_steps = steps
    metrics = train_from_config(cfg, parts, run_dir, evaluate=False, log=logger.log,
                                checkpoint_extra={"config": resolved(cfg), "logger_run_id": run_id})
    start = time.perf_counter()
    val = validate(parts.meta) if validate is not None else {"val_loss": metrics["meta_train_loss"]}
    validation_seconds = time.perf_counter() - start
    logger.log({**val, "rung": index}, steps)
    metrics.update(val, status="ok", config=resolved(cfg), rung=index, validation_seconds=validation_seconds)
    write_json_atomic(metrics, run_dir / "metrics.json")
    return Rung(index, steps, float(val["val_loss"]), float(metrics["train_seconds"]),
                int(metrics["measured_peak_bytes"]), validation_seconds), metrics


def worker_main(conn: Connection, threads: int, allocator: str = "system") -> None:
    """A worker process: runs the trials it is sent, one after another, until told "exit" (or its pipe closes).
    Reusing it saves the interpreter start and imports (seconds) per trial. `allocator`: its trials' config
    `allocator` (`metaopt.allocator`), as `train.py` applies it: a trial runs, and is timed, as its config would run
    alone (an Omniglot step under `keep` takes half the time)."""
    torch.set_num_threads(threads)
    set_allocator(allocator)  # type: ignore[arg-type]
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job == "exit":
            return
        if isinstance(job, tuple):  # a stale "stop"/"continue" for a finished trial is ignored
            trial_worker(*job, conn=conn)


def _start_logger(cfg: DictConfig, run_dir: Path, group: str | None) -> tuple[RunLogger, str]:
    """The trial's logged run: the id its checkpoint kept (a resumed trial), else a new one."""
    logger: RunLogger = instantiate(cfg.logger) if cfg.get("logger") else NullLogger()
    checkpoint = run_dir / "checkpoint.pt"
    run_id = (load_checkpoint(checkpoint).get("logger_run_id") if checkpoint.exists() else None) or new_run_id()
    logger.start(run_dir, resolved(cfg), run_id, group)
    return logger, run_id


def trial_worker(config_yaml: str, run_dir: str, rung_steps: list[int], group: str | None = None, *,
                 conn: Connection) -> None:
    """Run the trial's rungs in `run_dir`; send ("rung", Rung) after each, ("done",) after the last, or
    ("error", message, caught_by_budget_guard) and stop; between rungs wait for "continue" (anything else stops).
    `group`: the logged runs' group (the study)."""
    cfg = cast(DictConfig, OmegaConf.create(config_yaml))
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    logger: RunLogger = NullLogger()
    exit_code = 1
    try:
        parts = build(cfg)
        logger, run_id = _start_logger(cfg, path, group)
        validate = validation(cfg, parts)  # one per trial: it plans its evaluation once, at the first rung
        for index, steps in enumerate(rung_steps):
            rung, _ = _rung(cfg, parts, path, index, steps, logger, run_id, validate)
            conn.send(("rung", rung))
            if index + 1 == len(rung_steps):
                conn.send(("done",))
                exit_code = 0
                return
            if conn.recv() != "continue":
                exit_code = 0  # pruned or stopped at the deadline: not a failure
                return
    except BudgetExceeded as error:
        write_json_atomic(failure_record(cfg, error), path / "metrics.json")
        conn.send(("error", f"BudgetExceeded: {error}", True))
    except Exception as error:  # the trial's failure, recorded; the explorer goes on
        write_json_atomic(failure_record(cfg, error), path / "metrics.json")
        conn.send(("error", f"{type(error).__name__}: {error}", False))
    finally:
        logger.artifact(path / "metrics.json")
        logger.finish(exit_code)
