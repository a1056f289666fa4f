"""Run-time enforcement of a budget at inner-step boundaries.

A `StepGuard` is the `on_step` hook of `unroll`: after every inner step it reads
a clock and a memory probe (both injectable, so tests never depend on
wall-clock speed or on the machine) and, when the task has run past its budget,
acts on `budget.on_exceed`:

- "raise":    `BudgetExceeded`, naming the step, the figure and the limit;
- "truncate": `UnrollTruncated(steps)`: the estimator base recomputes the task's
              meta-gradient on the first `steps` inner steps (the steps that fit);
- "skip":     `TaskSkipped`: the task is left out of the meta-batch's mean.

Under vmap one guard watches a whole chunk of tasks, and its decision applies to
all of them.
"""
from __future__ import annotations

import time
from typing import Callable

from metaopt.budget import Budget, BudgetExceeded
from metaopt.types import InnerState

__all__ = ["StepGuard", "TaskSkipped", "UnrollTruncated", "format_bytes", "shifted"]


class TaskSkipped(Exception):
    """A task ran past its budget under on_exceed="skip"."""


class UnrollTruncated(Exception):
    """A task ran past its budget under on_exceed="truncate"; `steps` inner steps fitted."""

    def __init__(self, steps: int, reason: str):
        super().__init__(reason)
        self.steps = steps
        self.reason = reason


def format_bytes(n: float) -> str:
    """A byte count for people: 1.9 GB, 118 MB, 512 kB (decimal units, like Budget.parse)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


class StepGuard:
    """Checks one task's (or one vmapped chunk's) time and memory after each inner step.

    Args:
      budget: the limits and what to do past them.
      clock: seconds, monotonic (injectable for tests).
      memory_probe: bytes in use now (injectable); the guard watches its growth since `start()`.
      what: a name for messages, e.g. "task 3" or "tasks 0-24".
    """

    def __init__(self, budget: Budget, clock: Callable[[], float] = time.monotonic,
                 memory_probe: Callable[[], int] | None = None, what: str = "task"):
        self.budget, self.clock, self.memory_probe, self.what = budget, clock, memory_probe, what
        self.start()

    def start(self) -> None:
        """Restart the clock and the memory baseline (at the start of a task)."""
        self.started = self.clock()
        self.memory_base = self.memory_probe() if self.memory_probe and self.budget.memory else 0

    def __call__(self, step: int, state: InnerState) -> None:
        reason = None
        if self.budget.time is not None:
            elapsed = self.clock() - self.started
            if elapsed > self.budget.time:
                reason = f"{self.what} ran {elapsed:.3g} s, past its time budget of {self.budget.time:.3g} s"
        if reason is None and self.budget.memory is not None and self.memory_probe is not None:
            used = self.memory_probe() - self.memory_base
            if used > self.budget.memory:
                reason = (f"{self.what} uses {format_bytes(used)}, past its memory budget of "
                          f"{format_bytes(self.budget.memory)} (the prediction was too low)")
        if reason is None:
            return
        reason += f" at inner step {step + 1}"
        if self.budget.on_exceed == "truncate":
            raise UnrollTruncated(step, reason)  # steps 0..step-1 fitted
        if self.budget.on_exceed == "skip":
            raise TaskSkipped(reason)
        raise BudgetExceeded(reason)


def shifted(guard: StepGuard | None, offset: int) -> Callable[[int, InnerState], None] | None:
    """The guard as an `on_step` hook for an unroll that starts at inner step `offset` of the task."""
    if guard is None:
        return None
    return lambda step, state: guard(step + offset, state)
