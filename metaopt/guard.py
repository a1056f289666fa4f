"""Run-time enforcement of a budget at inner-step boundaries and after backward passes.

A `StepGuard` is the `on_step` hook of `unroll` and is also called by the runner
(`metaopt.runner`) after each chunk's backward pass, where reverse-mode estimators
peak. It reads a clock and a memory probe (both injectable, so tests never depend
on wall-clock speed or on the machine) and, when a call has run past its budget,
acts on `budget.on_exceed`:

- "raise":    `BudgetExceeded`, naming the step (or the backward pass), the figure and the limit;
- "truncate": `UnrollTruncated(steps)`: the runner recomputes the chunk's meta-gradient
              on its first `steps` inner steps (those that fitted; after a backward pass, the
              share of T that the budget allows); `TaskSkipped` when no step fits;
- "skip":     `TaskSkipped`: the task or chunk is left out of the meta-batch's mean.

Under vmap one guard watches a whole chunk of tasks, and its decision applies to
all of them.
"""
from __future__ import annotations

import dataclasses
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
    """Checks a meta-gradient call's memory and each chunk's time, at inner steps and after backward passes.

    Memory is the *peak* since `start()` (the runner calls it once per meta-gradient call, so
    every chunk, forward and backward, counts against one budget); time restarts per chunk
    (`restart_clock`), as the time budget is per task and a vmapped chunk shares one clock.

    Args:
      budget: the limits and what to do past them.
      clock: seconds, monotonic (injectable for tests).
      memory_probe: bytes now, or better the peak since `memory_reset` (injectable); the guard
        watches its growth since `start()`.
      what: a name for messages, e.g. "task 3" or "tasks 0-24".
      memory_reset: starts a new peak reading (`metaopt.memory.reset_peak`); None when the probe
        reads current bytes.
    """

    def __init__(self, budget: Budget, clock: Callable[[], float] = time.monotonic,
                 memory_probe: Callable[[], int] | None = None, what: str = "task",
                 memory_reset: Callable[[], None] | None = None):
        self.budget, self.clock, self.memory_probe, self.what = budget, clock, memory_probe, what
        self.memory_reset = memory_reset
        self.start()

    def start(self) -> None:
        """Restart the clock and the memory baseline (at the start of a meta-gradient call)."""
        if self.memory_probe is not None and self.budget.memory is not None:
            if self.memory_reset is not None:
                self.memory_reset()
            self.memory_base = self.memory_probe()
        else:
            self.memory_base = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Restart the time budget (at the start of a task or vmapped chunk)."""
        self.started = self.clock()

    def memory_only(self) -> "StepGuard":
        """A copy that checks only memory, against the same baseline (for recomputing steps that fitted)."""
        copy = StepGuard.__new__(StepGuard)
        copy.__dict__.update(self.__dict__)
        copy.budget = dataclasses.replace(self.budget, time=None)
        return copy

    def _overrun(self) -> tuple[str, float] | None:
        """(why, limit / used) when past the budget, else None."""
        if self.budget.time is not None:
            elapsed = self.clock() - self.started
            if elapsed > self.budget.time:
                return (f"{self.what} ran {elapsed:.3g} s, past its time budget of {self.budget.time:.3g} s",
                        self.budget.time / elapsed)
        if self.budget.memory is not None and self.memory_probe is not None:
            used = self.memory_probe() - self.memory_base
            if used > self.budget.memory:
                return (f"{self.what} uses {format_bytes(used)}, past its memory budget of "
                        f"{format_bytes(self.budget.memory)} (the prediction was too low)", self.budget.memory / used)
        return None

    def __call__(self, step: int, state: InnerState) -> None:
        """The `on_step` hook of `unroll`, after inner step `step` (0-based)."""
        overrun = self._overrun()
        if overrun is not None:
            self._act(f"{overrun[0]} at inner step {step + 1}", step)  # steps 0..step-1 fitted

    def after_backward(self, steps: int) -> None:
        """Check after a chunk's backward pass (where reverse-mode estimators peak); `steps` is the
        chunk's T. Under "truncate" the chunk is recomputed on the share of its steps that fits."""
        overrun = self._overrun()
        if overrun is not None:
            self._act(f"{overrun[0]} in its backward pass", int(steps * overrun[1] * 0.9))

    def _act(self, reason: str, steps: int) -> None:
        if self.budget.on_exceed == "truncate" and steps > 0:
            raise UnrollTruncated(steps, reason)
        if self.budget.on_exceed in ("truncate", "skip"):
            raise TaskSkipped(reason)
        raise BudgetExceeded(reason)


def shifted(guard: StepGuard | None, offset: int) -> Callable[[int, InnerState], None] | None:
    """The guard as an `on_step` hook for an unroll that starts at inner step `offset` of the task."""
    if guard is None:
        return None
    return lambda step, state: guard(step + offset, state)
