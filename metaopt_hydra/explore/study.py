"""The Optuna study behind the explorer: sampling, constraints, storage, and the trial records it keeps.

Every trial's outcome lives in the study's storage as user attributes (status, estimator chosen,
predicted and measured peak bytes, training seconds, validation loss, meta-steps reached, error,
parent, config), so several explorer workers (on one machine or many) sharing one storage see one
study, and a killed explorer resumes from it. Complete trials are told their three objectives
(validation loss, training seconds, predicted peak bytes; all minimized); infeasible ones are told
with infinite objectives and a positive constraint, so the sampler learns the region.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from metaopt.explore.scheduler import Rung, TrialRecord
from metaopt_hydra.explore.search import SearchSpace

__all__ = ["ExplorerStudy", "open_storage"]

log = logging.getLogger("metaopt")
DONE = ("complete", "pruned", "infeasible", "failed")


def open_storage(storage: str | None, run_dir: Path) -> Any:
    """An Optuna storage: a journal file in `run_dir` by default (works on NFS, no server), a journal file
    path, or any storage URL (postgresql://... for many machines; not SQLite with several workers)."""
    if storage is None or not str(storage).strip():
        return JournalStorage(JournalFileBackend(str(run_dir / "study.journal")))
    if "://" in str(storage):
        return str(storage)
    return JournalStorage(JournalFileBackend(str(storage)))


class ExplorerStudy:
    """The engine's `Study` over an Optuna multi-objective study (TPE with constraints)."""

    def __init__(self, storage: Any, name: str, space: SearchSpace, worker: str, memory_share: int, seed: int = 0):
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=6)
        self.study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                                         directions=["minimize", "minimize", "minimize"])
        self.space, self.worker, self.share = space, worker, memory_share
        self.trials: dict[int, optuna.Trial] = {}

    def ask(self) -> tuple[int, dict[str, Any]]:
        trial = self.study.ask(self.space.distributions)
        trial.set_user_attr("worker", self.worker)
        self.trials[trial.number] = trial
        return trial.number, dict(trial.params)

    def ask_child(self, params: dict[str, Any], parent: int, priority: float) -> int:
        self.study.enqueue_trial(params, user_attrs={"parent": parent, "priority": priority}, skip_if_exists=False)
        trial = self.study.ask(self.space.distributions)
        trial.set_user_attr("worker", self.worker)
        self.trials[trial.number] = trial
        return trial.number

    def keep_config(self, trial: int, config_yaml: str) -> None:
        self.trials[trial].set_user_attr("config", config_yaml)

    def tell(self, record: TrialRecord) -> None:
        trial = self.trials[record.trial]
        attrs = {"status": record.status, "estimator_chosen": record.estimator_chosen, "error": record.error,
                 "predicted_peak_bytes": record.predicted_peak_bytes,
                 "predicted_step_seconds": record.predicted_step_seconds,
                 "measured_peak_bytes": record.measured_peak_bytes, "train_seconds": record.train_seconds,
                 "val_loss": record.val_loss, "meta_steps": record.rungs[-1].meta_steps if record.rungs else 0,
                 "rungs": len(record.rungs), "parent": record.parent}
        for key, value in attrs.items():
            trial.set_user_attr(key, None if isinstance(value, float) and math.isnan(value) else value)
        # Feasible when <= 0: the predicted peak against the per-trial share (the sampler learns the region).
        trial.set_constraint("memory", float(record.predicted_peak_bytes - self.share)
                             if record.status != "infeasible" else 1.0)
        if record.status == "infeasible":
            self.study.tell(trial, [math.inf, math.inf, math.inf])
        elif record.status == "complete" and math.isfinite(record.val_loss):
            self.study.tell(trial, list(record.objectives()))
        else:
            self.study.tell(trial, state=TrialState.PRUNED if record.status == "pruned" else TrialState.FAIL)

    def records(self) -> list[TrialRecord]:
        """Every finished trial of the study (all workers), as engine records."""
        out = []
        for t in self.study.get_trials(deepcopy=False):
            a = t.user_attrs
            if a.get("status") not in DONE:
                continue
            rungs = []
            if a.get("val_loss") is not None and a.get("rungs", 0):
                rungs = [Rung(a["rungs"] - 1, a["meta_steps"], a["val_loss"], a["train_seconds"],
                              a["measured_peak_bytes"])]
            record = TrialRecord(t.number, dict(t.params), a.get("parent"), a["status"], a.get("estimator_chosen", ""),
                                 a.get("predicted_peak_bytes", 0), rungs, a.get("error", ""),
                                 predicted_step_seconds=a.get("predicted_step_seconds"))
            out.append(record)
        return out

    def fail_stale(self) -> int:
        """Trials this worker left running when it was killed: told failed (their configs stay in the study)."""
        stale = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
                 if t.user_attrs.get("worker") == self.worker]
        for t in stale:
            self.study.tell(t.number, state=TrialState.FAIL)
        return len(stale)

    def config(self, trial: int) -> str | None:
        return self.study.get_trials(deepcopy=False)[trial].user_attrs.get("config")
