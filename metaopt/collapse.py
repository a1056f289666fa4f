"""Noticing that meta-training collapsed, and rolling back instead of finishing "ok".

Learned optimizers (and other long-unroll meta-learners) can leave the region where
meta-training works and never come back: the shipped learned-optimizer config reached
a meta-train loss of 0.285 at meta-step 100 and sat at ln 10 (chance for 10 classes)
from meta-step 300 on, while the run still ended with status ok.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from metaopt.callbacks import Callback, RunState

logger = logging.getLogger("metaopt")

__all__ = ["CollapseGuard", "TrainingCollapsed"]


class TrainingCollapsed(RuntimeError):
    """Meta-training collapsed and no rollback is left (the message says how)."""


@dataclass
class CollapseGuard(Callback):
    """Watches the history's meta-train loss; on a collapse, rolls back or stops (a `meta_train` callback).

    A collapse is a non-finite loss, a loss within `chance_tolerance` (relative) of
    `chance_loss` (e.g. ln 10 for 10-way classification; None: not checked), or a loss
    that rose for `patience` history entries in a row (0: not checked). On one, the
    meta-parameters and the outer optimizer return to the state of the best entry so far,
    the outer learning rate is multiplied by `lr_factor`, and training goes on (the task
    stream is not rewound); after `rollbacks` rollbacks it raises `TrainingCollapsed`.

    Args:
      chance_loss, chance_tolerance, patience, rollbacks, lr_factor: see above.
    """

    chance_loss: float | None = None
    chance_tolerance: float = 0.01
    patience: int = 0
    rollbacks: int = 2
    lr_factor: float = 0.5
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._best: tuple[float, dict[str, Any], dict[str, Any]] | None = None
        self._rising = 0
        self._last = math.inf

    def reason(self, loss: float) -> str | None:
        """Why the newest entry's meta-train loss is a collapse, or None."""
        if math.isnan(loss) or math.isinf(loss):
            return f"meta-train loss is {loss}"
        if self.chance_loss is not None and abs(loss - self.chance_loss) <= self.chance_tolerance * self.chance_loss:
            return f"meta-train loss {loss:.4f} is at chance level ({self.chance_loss:.4f})"
        self._rising = self._rising + 1 if loss > self._last else 0
        self._last = loss
        if self.patience and self._rising >= self.patience:
            return f"meta-train loss rose for {self._rising} logging intervals in a row (to {loss:.4f})"
        return None

    def on_entry(self, state: RunState, entry: dict[str, Any], last: bool) -> None:
        rollbacks = len(self.events)
        self.watch(state.step, entry["meta_train_loss"], state.meta, state.outer_optimizer)
        if len(self.events) > rollbacks:
            entry["rollback"] = self.events[-1]["reason"]
            logger.warning("meta-step %d: %s; rolled back to the best state, outer lr now %s", state.step,
                           entry["rollback"], self.events[-1]["outer_lr"])

    def on_end(self, state: RunState) -> dict[str, Any]:
        return {"collapse_rollbacks": self.events}

    def watch(self, step: int, loss: float, meta: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After each history entry: remember the best state, or handle a collapse."""
        why = self.reason(loss)
        if why is None:
            if self._best is None or loss < self._best[0]:
                self._best = (loss, copy.deepcopy(meta.state_dict()), copy.deepcopy(optimizer.state_dict()))
            return
        if len(self.events) >= self.rollbacks or self._best is None:
            if self._best is not None:
                self.restore_best(meta, optimizer)  # what is saved is the best state, not the collapsed one
            raise TrainingCollapsed(f"meta-step {step}: {why}; {len(self.events)} rollback(s) already spent "
                                    f"(the best state, meta-train loss {self._best[0] if self._best else math.nan:.4f}, "
                                    f"is kept)")
        self.restore_best(meta, optimizer)
        for group in optimizer.param_groups:  # the snapshot's lr, lowered once per rollback so far
            for key in ("lr", "initial_lr"):  # initial_lr: the base of an lr schedule (train.StepConfig)
                if key in group:
                    group[key] *= self.lr_factor ** (len(self.events) + 1)
        self.events.append({"meta_step": step, "reason": why, "restored_loss": self._best[0],
                            "outer_lr": [g["lr"] for g in optimizer.param_groups]})
        self._rising, self._last = 0, self._best[0]

    def restore_best(self, meta: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        assert self._best is not None
        meta.load_state_dict(self._best[1])
        optimizer.load_state_dict(self._best[2])
