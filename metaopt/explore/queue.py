"""The explorer's bounded priority queue of candidate configurations."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Candidate", "CandidateQueue"]


@dataclass
class Candidate:
    """A configuration waiting to run.

    Attributes:
      priority: lower runs first. A child's is its parent's non-domination rank (0: a front member);
        the sampler's candidates get `CandidateQueue.sampler_priority`.
      params: searched key -> value.
      trial: the id of its trial in the study's storage.
      parent: the trial it was perturbed from (None: drawn by the sampler).
      predicted_peak_bytes: filled in once admission has priced it (None before).
      estimator_chosen: the estimator admission settled on (the asked one, or one down the ladder).
      predicted_step_seconds: admission's approximate seconds per meta-step (None: not predicted).
      order: insertion order (ties run first-in, first-out).
    """

    priority: float
    params: dict[str, Any]
    trial: int
    parent: int | None = None
    predicted_peak_bytes: int | None = None
    estimator_chosen: str | None = None
    predicted_step_seconds: float | None = None
    order: int = field(default=0, compare=False)


class CandidateQueue:
    """At most `capacity` candidates; `push` returns the candidate that fell out (the lowest priority, i.e. the
    largest `priority` number, newest first among equals), if any."""

    sampler_priority = 1.0  # between children of front members (0) and of rank-1 trials (1, older first)

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: list[Candidate] = []
        self._count = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        """Candidates in the order they would run."""
        return iter(sorted(self._items, key=lambda c: (c.priority, c.order)))

    def push(self, candidate: Candidate) -> Candidate | None:
        candidate.order = self._count
        self._count += 1
        self._items.append(candidate)
        if len(self._items) <= self.capacity:
            return None
        worst = max(self._items, key=lambda c: (c.priority, c.order))
        self._items.remove(worst)
        return worst

    def remove(self, candidate: Candidate) -> None:
        self._items.remove(candidate)
