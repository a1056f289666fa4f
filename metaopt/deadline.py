"""A session's wall-clock limit, evaluation included: training stops in time to leave what follows it.

`time_limit` (`meta_train`) bounds training alone, summed over resumed sessions: a compute budget for the result.
A job has another limit: the wall-clock it may hold (a SLURM allocation's `--time`, a laptop's hour), after which
it is killed whatever it was doing, so the evaluation that would have given the run its figure is lost. A
`Deadline` is that limit for one session: the work planned after training (the final evaluation, protocols, a
validation at the end) reserves its predicted seconds, times `margin`, before the first meta-step, and training
stops when the next meta-step would eat into them. Evaluation's predictions come from timed calls
(`metaopt.evaluation.plan_evaluation`), so the reservation is approximate: `margin` (1.5) covers the 0.97-1.42x
measured / predicted ratios README records. Work whose seconds are not predicted (an evaluation that could not be
timed, a callback without a prediction) cannot be reserved; it is named in `unreserved` and `record()`.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from metaopt.budget import TimeBudgetExceeded

__all__ = ["Deadline", "DeadlineExceeded", "RESERVE_MARGIN"]

logger = logging.getLogger("metaopt")

RESERVE_MARGIN = 1.5
"""Reserved seconds per predicted second of the work after training (evaluation's predictions: 0.97-1.42x)."""


class DeadlineExceeded(TimeBudgetExceeded):
    """Refused before training: the work planned after training, with its margin, does not fit what is left of
    the session's wall-clock limit."""


class Deadline:
    """A session's wall-clock limit of `seconds` from `start` (default: now), with seconds reserved for the work
    after training.

    Args:
      seconds: the session's wall-clock limit (seconds; > 0).
      start: when the session's clock started, in `clock()`'s seconds (default: now). A launcher's start-up
        before this process runs is not seen: leave room for it in `seconds` (`metaopt_hydra.jobs`).
      clock: monotonic seconds (`time.perf_counter`; tests pass a stand-in).
      margin: reserved seconds per predicted second.
    """

    def __init__(self, seconds: float, *, start: float | None = None, clock: Callable[[], float] = time.perf_counter,
                 margin: float = RESERVE_MARGIN):
        if not seconds > 0:
            raise ValueError(f"Deadline: need seconds > 0, got {seconds!r}")
        self.seconds, self.clock, self.margin = float(seconds), clock, margin
        self.start = clock() if start is None else start
        self.reserved: dict[str, float] = {}  # what -> predicted seconds (before the margin)
        self.kept: dict[str, float] = {}  # what -> seconds kept as they are (an allowance, not a prediction)
        self.unreserved: list[str] = []  # work after training whose seconds are not predicted
        self.training_ended: float | None = None  # `elapsed()` when training ended (`end_training`)

    def elapsed(self) -> float:
        """Seconds since the session started."""
        return self.clock() - self.start

    def reserve(self, what: str, predicted_seconds: float | None) -> None:
        """Keep `margin x predicted_seconds` for `what`, run after training (None: not predicted; recorded in
        `unreserved` and said in the log)."""
        if predicted_seconds is None:
            self.unreserved.append(what)
            logger.warning("job time limit: %s after training has no predicted seconds; nothing is kept for it",
                           what)
            return
        self.reserved[what] = self.reserved.get(what, 0.0) + max(float(predicted_seconds), 0.0)

    def keep(self, what: str, seconds: float) -> None:
        """Keep `seconds` for `what` after training, as they are: an allowance (e.g. writing the record), not a
        predicted figure that the margin scales."""
        self.kept[what] = self.kept.get(what, 0.0) + max(float(seconds), 0.0)

    @property
    def reserved_seconds(self) -> float:
        """The seconds kept for the work after training: the predicted ones times the margin, and the allowances."""
        return self.margin * sum(self.reserved.values()) + sum(self.kept.values())

    def training_left(self) -> float:
        """Seconds training may still take (negative: already past)."""
        return self.seconds - self.elapsed() - self.reserved_seconds

    def check(self, before: str = "training") -> None:
        """Refuse (`DeadlineExceeded`) where nothing is left for `before` once the reservations are kept; call
        it after planning, before the first meta-step."""
        left = self.training_left()
        if left > 0:
            logger.info("job time limit %.1f s: %.1f s elapsed, %.1f s kept for %s (x%.2g of their predicted "
                        "seconds) and the end, %.1f s left for %s", self.seconds, self.elapsed(),
                        self.reserved_seconds, ", ".join(self.reserved) or "nothing", self.margin, left, before)
            return
        predicted = ", ".join(f"{what} {seconds:.3g} s" for what, seconds in self.reserved.items()) or "nothing"
        allowed = "".join(f"; {seconds:.3g} s kept for {what}" for what, seconds in self.kept.items())
        raise DeadlineExceeded(
            f"job time limit {self.seconds:.4g} s: {self.elapsed():.3g} s have gone to set-up and planning, and the "
            f"work after training is predicted {predicted} (kept x{self.margin:.2g}{allowed}: "
            f"{self.reserved_seconds:.4g} s in all), which leaves nothing for {before}; raise job_time_limit, or "
            f"predict less work after training (fewer eval.n_tasks, fewer eval.protocols)")

    def end_training(self) -> None:
        """Mark the end of training: what follows is the work the reservations were for."""
        self.training_ended = self.elapsed()

    def share(self, parts: int) -> "Deadline":
        """A deadline for the next of `parts` equal shares of what is left for training now (an ensemble's
        members trained in turn); the reservations stay with this one."""
        if parts < 1:
            raise ValueError(f"Deadline.share: need parts >= 1, got {parts}")
        now = self.elapsed()
        left = max(self.seconds - now - self.reserved_seconds, 0.0) / parts
        return Deadline(max(now + left, 1e-9), start=self.start, clock=self.clock, margin=self.margin)

    def record(self) -> dict[str, Any]:
        """The metrics.json entries, every key "job_...": "job_time_limit" (s), "job_reserved" ({what: predicted
        s}), "job_kept" ({what: allowance s}), "job_reserved_seconds" (margin and allowances included),
        "job_unreserved" (work with no prediction), "job_seconds" (elapsed when recorded) and
        "job_after_training_seconds" (from the end of training to now, measured; None before it)."""
        now = self.elapsed()
        return {"job_time_limit": self.seconds, "job_reserved": dict(self.reserved), "job_kept": dict(self.kept),
                "job_reserved_seconds": self.reserved_seconds, "job_unreserved": list(self.unreserved),
                "job_seconds": now,
                "job_after_training_seconds": None if self.training_ended is None else now - self.training_ended}
