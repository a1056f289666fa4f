"""How long an explorer trial will take to reach its next rung, before it runs: the planner's seconds, calibrated.

Admission prices a trial's memory with the planner, whose probes run the meta-gradient call at a few inner steps;
those calls are timed too (`metaopt.planning.Plan.predicted_call_seconds`), and so is the draw of the meta-batch
they run on: a predicted seconds per meta-step costs next to nothing more. It is approximate in two ways that the
trials themselves correct:

- **per meta-step**: the probes ran once each, in the scheduler's process, beside the running trials, and a trial's
  meta-step adds the outer update and its bookkeeping. `RungTimes` keeps the ratio measured / predicted seconds per
  meta-step of every trial that reported a rung and scales predictions by their median; a trial that has reported
  a rung is predicted from its own measured seconds per meta-step.
- **per rung**: a rung costs more than its meta-steps (a first rung the worker's build and the plan's probes, every
  rung its validation and checkpoint). The validation is the part that differs most between trials (a 60-way
  model validates slower than a 5-way one; its validation tasks are fixed), so each rung reports its own, measured:
  a trial's next rung is priced with its own last validation, a first rung with the median of every trial's.
  The rest, the median of (wall-clock seconds to the rung - training seconds in it - its validation), is kept
  apart for first rungs and for later ones.

Before any rung is reported the ratio is 1 and the overheads 0 (the prediction as the probes timed it).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["RungTimes"]


def _median(values: list[float], default: float) -> float:
    return statistics.median(values) if values else default


@dataclass
class RungTimes:
    """Observed rungs in, predicted wall-clock seconds to a rung out (see the module docstring). Seconds throughout.

    Attributes:
      ratios: measured / predicted seconds per meta-step, one per trial with a prediction (at its first rung).
      first_overheads, next_overheads: wall-clock seconds to a rung less the training seconds and the validation in
        it, for first rungs (from the trial's start) and later ones (from its resumption).
      validations: the seconds of every timed rung's validation.
    """

    ratios: list[float] = field(default_factory=list)
    first_overheads: list[float] = field(default_factory=list)
    next_overheads: list[float] = field(default_factory=list)
    validations: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """The median measured / predicted seconds per meta-step so far (1 before any)."""
        return _median(self.ratios, 1.0)

    def observe(self, predicted_step_seconds: float | None, meta_steps: int, train_seconds: float,
                wall_seconds: float | None = None, train_seconds_before: float = 0.0, first: bool = True,
                validation_seconds: float = 0.0) -> None:
        """A rung reported at `meta_steps` meta-steps after `train_seconds` of training in all (cumulative over its
        rungs; `train_seconds_before` of them before this rung) and a validation of `validation_seconds`,
        `wall_seconds` after the trial was started (`first`) or resumed (None: not timed, e.g. a rung of an earlier
        session of the study). A trial's ratio is taken at its first rung only: every trial counts once."""
        if first and predicted_step_seconds and predicted_step_seconds > 0 and meta_steps > 0 and train_seconds > 0:
            self.ratios.append(train_seconds / meta_steps / predicted_step_seconds)
        if wall_seconds is not None:
            overhead = max(wall_seconds - (train_seconds - train_seconds_before) - validation_seconds, 0.0)
            (self.first_overheads if first else self.next_overheads).append(overhead)
            self.validations.append(validation_seconds)

    def to_first_rung(self, predicted_step_seconds: float | None, meta_steps: int) -> float | None:
        """Predicted wall-clock seconds from a trial's start to its first rung at `meta_steps` (the median
        validation: the trial has not validated yet); None without a prediction per meta-step."""
        if predicted_step_seconds is None:
            return None
        return (_median(self.first_overheads, 0.0) + _median(self.validations, 0.0)
                + meta_steps * predicted_step_seconds * self.ratio)

    def to_next_rung(self, measured_step_seconds: float, meta_steps: int,
                     validation_seconds: float | None = None) -> float:
        """Predicted wall-clock seconds from a trial's resumption to its next rung, `meta_steps` meta-steps on, at
        its own measured seconds per meta-step and with its own last validation's seconds (None: the median's)."""
        validation = validation_seconds if validation_seconds is not None else _median(self.validations, 0.0)
        return (_median(self.next_overheads, _median(self.first_overheads, 0.0)) + validation
                + meta_steps * measured_step_seconds)
