"""Hooks into `metaopt.train.meta_train`'s history entries: validation, collapse handling, your own.

`meta_train` is a short driver (plan, loop of `meta_step`, checkpoint, evaluate, log); what
else happens during a run is a `Callback`. After each meta-step the driver asks every callback
whether it wants a history entry now (`due`); at logging intervals, at the last meta-step and
where one is due it builds the entry (meta_step, mean meta-train loss since the last one,
seconds per meta-step, task counts), hands it to each callback in order (`on_entry`: a callback
may add keys, e.g. validation metrics, or change the train state, e.g. roll it back), then
logs it. At the end each callback's `on_end` adds to the run's metrics.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from metaopt.types import MetaParams

__all__ = ["Callback", "Validation", "RunState"]


class RunState(Protocol):
    """What callbacks see of `metaopt.train.TrainState`."""

    meta: MetaParams
    outer_optimizer: torch.optim.Optimizer
    step: int


class Callback:
    """A meta-training hook (subclass and override what you need; the defaults do nothing)."""

    def due(self, step: int) -> bool:
        """Whether this callback needs a history entry after meta-step `step` (besides the logging ones). Asked
        once per step that is not a logging one; an overlapped loop (`meta_train(overlap=...)`) asks before the
        step runs, to run it in turn where an entry will read the state after it."""
        return False

    def on_entry(self, state: RunState, entry: dict[str, Any], last: bool) -> None:
        """Called with each history entry, before it is logged (`last`: the run's final meta-step)."""

    def on_end(self, state: RunState) -> dict[str, Any]:
        """Entries for the run's returned metrics."""
        return {}

    def seconds_after(self, step: int, meta: MetaParams) -> float:
        """Predicted seconds of this callback's work after meta-step `step` (counted from 1) during training, e.g.
        a periodic validation: under a time limit the loop starts that step only where they fit beside it (0.0:
        none, or not predicted)."""
        return 0.0

    def end_seconds(self, meta: MetaParams) -> float | None:
        """Predicted seconds of this callback's work after the last meta-step (its last entry's and `on_end`'s),
        asked before training where the run has a wall-clock deadline (`metaopt.deadline`): 0.0 for none, None
        for work it cannot predict."""
        return 0.0


class Validation(Callback):
    """Metrics on validation tasks (never the meta-test tasks) every `every` meta-steps and at the end.

    Args:
      validate: meta -> metrics, e.g. {"val_loss": ...}; they join the history entries and the run's metrics.
        Its `predicted_seconds(meta)`, where it has one (`metaopt_hydra.build.Validator`), prices the validation
        at the end for a deadline; without one that validation is not predicted.
      every: meta-steps between validations (0: only at the end).
    """

    def __init__(self, validate: Callable[[MetaParams], dict[str, float]], every: int = 0):
        self.validate, self.every = validate, every
        self.latest: tuple[int, dict[str, float]] | None = None  # (meta-step, metrics)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def on_entry(self, state: RunState, entry: dict[str, Any], last: bool) -> None:
        if last or self.due(state.step):
            self.latest = (state.step, self.validate(state.meta))
            entry.update(self.latest[1])

    def on_end(self, state: RunState) -> dict[str, Any]:
        """The validation metrics at the last meta-step (run now if the last entry had none, e.g. on a resume
        with no step left)."""
        if self.latest is None or self.latest[0] != state.step:
            self.latest = (state.step, self.validate(state.meta))
        return dict(self.latest[1])

    def seconds_after(self, step: int, meta: MetaParams) -> float:
        """One validation's predicted seconds where one is due after `step` (0.0 where none is, or it has no
        prediction)."""
        seconds = self.end_seconds(meta) if self.due(step) else None
        return 0.0 if seconds is None else float(seconds)

    def end_seconds(self, meta: MetaParams) -> float | None:
        """One validation (at the last entry, or in `on_end` after a stop at a time limit): `validate`'s
        `predicted_seconds(meta)`, or None where it has none."""
        predict = getattr(self.validate, "predicted_seconds", None)
        return predict(meta) if predict is not None else None
