"""The explorer's scheduler: admission, packing, rungs, dominance pruning, children, the deadline.

One loop, driven by an injectable clock:

- **Queue.** A bounded priority queue (`CandidateQueue`) fed by the study's sampler (always one
  draw waiting, more to fill free slots) and by children perturbed around front members (a
  child's priority is its parent's non-domination rank). Starts alternate between the sampler's
  draws and children: without that, the children of a front that is growing fill every slot and
  the sampler stops exploring (measured: 87 of 89 trials were children of the first few).
- **Admission.** Before a candidate runs, the runner prices it (`TrialRunner.price`): the
  predicted peak of its meta-step under the per-trial memory share (`memory / max_parallel`),
  with a cheaper estimator from the `auto` ladder when the asked one does not fit, or the reason
  it cannot fit at all (the trial is then recorded as infeasible without running). The planner's probes
  were timed too: the price includes approximate seconds per meta-step, calibrated by the rungs run so
  far (`RungTimes`), and a candidate predicted to reach its first rung only past the deadline is not
  started: it leaves the queue (pruned, event "late"), and a cheaper one may start in its place.
- **Packing.** Candidates start first-fit in priority order while the peaks of the running trials
  (predicted, or measured at a rung once higher), plus the candidate's predicted one, stay within
  `memory`, and at most `max_parallel` run.
- **Rungs.** A trial advances in rungs of `rung_steps x eta^r` meta-steps; at each boundary it
  reports its validation loss, and continues only if it is non-dominated (validation loss,
  training seconds, peak bytes: predicted, or measured where higher) among all trials that reached
  that rung, and, once more than eta trials have reached it, among the ceil(n / eta) front members
  with the lowest validation loss (multi-objective asynchronous successive halving, Schmucker et al.
  2021); else it is pruned. Without the quota nearly every trial survives: memory and time are fixed
  by the configuration, not by training, so a cheap configuration is non-dominated however poor its
  loss (measured on the sinusoid search: 15 of the first 16 trials ran to the last rung). The quota
  ranks by loss, the one objective a rung measures: ranked by NSGA-II crowding distance instead, the
  extremes of time and memory (first-order MAML at T=1, loss ~3 and not learning) took the places
  and the configuration that ended best elsewhere was pruned at 50 meta-steps (hypervolume 0.94x
  sequential TPE's in `experiments/bench_explore.py`).
- **Failures.** A trial stopped by its run-time guard (a misprediction) is retried once per rung
  down the estimator ladder; any other error fails it.
- **Deadline.** At `time` seconds no new trial starts, running trials are stopped, and their last
  rung counts. A trial whose next rung is predicted (at its own measured seconds per meta-step) to end
  past the deadline stops at the rung it reached, as complete: the rest would be cut off unreported,
  and its place goes to a trial that can report.

Every start, stop and late candidate goes to `events` (time, trial, event, running_predicted_bytes: the running trials'
predicted peaks summed, running_reserved_bytes: the same with measured peaks where higher).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol

from metaopt.explore.pareto import non_dominated_ranks
from metaopt.explore.queue import Candidate, CandidateQueue
from metaopt.explore.timing import RungTimes

__all__ = ["Rung", "RungPrice", "TrialRecord", "TrialRunner", "Study", "Explorer", "Message", "Price", "CUT",
           "NOT_STARTED_LATE", "STOPPED_BEFORE_LATE_RUNG"]

# How a trial's record (`error`) says what the deadline did to it (`metaopt_hydra.explore.report` counts them).
CUT = "stopped at the deadline before its first rung"
NOT_STARTED_LATE = "not started: its first rung was predicted"
STOPPED_BEFORE_LATE_RUNG = "its next rung"


class Rung(NamedTuple):
    """What a trial reports at a rung boundary."""

    level: int  # the rung's number: 0, 1, ...
    meta_steps: int
    val_loss: float
    train_seconds: float
    measured_peak_bytes: int
    validation_seconds: float = 0.0  # the rung's validation, measured (its trial's next rungs are priced with it)


class RungPrice(NamedTuple):
    """A rung's wall-clock seconds (from the trial's start, or its resumption), predicted and measured."""

    first: bool  # the trial's first rung (priced at admission), or a later one (priced at the rung before)
    predicted_seconds: float
    measured_seconds: float


class Message(NamedTuple):
    """From a running trial: kind "rung" (with `rung`), "done" (finished its last rung), or "error"
    (with `error`; `budget` True when the run-time guard stopped it: a misprediction)."""

    kind: str
    rung: Rung | None = None
    error: str = ""
    budget: bool = False


class Price(NamedTuple):
    """What admission learns of a candidate before it runs."""

    peak_bytes: int  # the predicted peak of its meta-step
    estimator: str  # the estimator chosen (the asked one, or one down the ladder)
    step_seconds: float | None = None  # approximate seconds per meta-step (None: not predicted)


@dataclass
class TrialRecord:
    """Everything the explorer knows about one trial (one row of pareto.csv)."""

    trial: int
    params: dict[str, Any]
    parent: int | None = None
    status: str = "queued"  # queued | running | complete | pruned | infeasible | failed
    estimator_chosen: str = ""
    predicted_peak_bytes: int = 0
    rungs: list[Rung] = field(default_factory=list)
    error: str = ""
    retries: int = 0
    excluded: list[str] = field(default_factory=list)  # estimators whose prediction the guard caught too low
    predicted_step_seconds: float | None = None  # admission's approximate seconds per meta-step

    @property
    def measured_step_seconds(self) -> float:
        """Training seconds per meta-step at its last rung (nan before one)."""
        return self.rungs[-1].train_seconds / self.rungs[-1].meta_steps if self.rungs else math.nan

    @property
    def val_loss(self) -> float:
        return self.rungs[-1].val_loss if self.rungs else math.nan

    @property
    def train_seconds(self) -> float:
        return self.rungs[-1].train_seconds if self.rungs else math.nan

    @property
    def measured_peak_bytes(self) -> int:
        return max((r.measured_peak_bytes for r in self.rungs), default=-1)

    def at(self, rung: int) -> Rung | None:
        """Its result at rung index `rung`, if it reported one (a resumed record knows only its last rung)."""
        return next((r for r in self.rungs if r.level == rung), None)

    @property
    def peak_bytes(self) -> int:
        """The memory the trial takes, in bytes: its predicted peak, or its measured one where the run took more
        (0 before it was priced). The front's memory axis: a prediction may run low (see `objectives`)."""
        return max(self.predicted_peak_bytes, self.measured_peak_bytes)

    def objectives(self, rung: int | None = None) -> tuple[float, float, float]:
        """(validation loss, training seconds, peak bytes) at `rung` (default: the last reached). The peak is the
        predicted one, or the peak measured up to that rung where it is higher: a prediction measured in the
        explorer's long-lived process can run low (measured on Omniglot: 349 MB predicted, 597 MB taken), and
        a front that states the prediction would promise a configuration that cannot keep to it."""
        r = self.rungs[-1] if rung is None else self.at(rung)
        assert r is not None, f"trial {self.trial} has no result at rung {rung}"
        return (r.val_loss, r.train_seconds, float(max(self.predicted_peak_bytes, r.measured_peak_bytes)))


class TrialRunner(Protocol):
    """Prices and runs trials (real: worker processes; tests: tiny objectives)."""

    def price(self, candidate: Candidate, memory_share: int, excluded: list[str]) -> Price | tuple[int, str] | str:
        """The `Price` of the first plan that fits `memory_share`, skipping the estimators in `excluded` (a plain
        (peak bytes, estimator) pair: no seconds predicted), or why nothing fits."""

    def start(self, candidate: Candidate, rung_steps: list[int]) -> Any: ...

    def poll(self, handle: Any) -> list[Message]: ...

    def resume(self, handle: Any) -> None: ...

    def stop(self, handle: Any) -> None: ...


class Study(Protocol):
    """Where trials are drawn and recorded (real: an Optuna study)."""

    def ask(self) -> tuple[int, dict[str, Any]]: ...

    def ask_child(self, params: dict[str, Any], parent: int, priority: float) -> int: ...

    def tell(self, record: TrialRecord) -> None: ...


@dataclass
class _Running:
    candidate: Candidate
    record: TrialRecord
    handle: Any
    since: float  # the clock when it was started or last resumed
    predicted_seconds: float | None = None  # wall-clock seconds to its next rung, predicted when started or resumed


class Explorer:
    """See the module docstring.

    Args:
      runner, study: see `TrialRunner`, `Study`.
      memory: bytes the running trials' predicted peaks may sum to.
      time_budget: seconds until the deadline.
      max_parallel: trials running at once at most.
      rung_steps, eta, rungs: rung r runs to `rung_steps * eta**r` meta-steps, r < `rungs`.
      queue_size: the queue's capacity.
      children: children perturbed around a trial that enters the front.
      perturb: `perturb(params, rng) -> params` for children.
      clock, sleep: injectable (tests use a fake clock).
      previous: finished trials of an earlier session of the same study (resume).
      max_trials: stop drawing from the sampler after this many trials (None: until the deadline).
      progress: called with a one-line status every `progress_every` seconds.
      on_event: called with each start/stop event as it happens (the app appends it to events.jsonl).
    """

    def __init__(self, runner: TrialRunner, study: Study, *, memory: int, time_budget: float, max_parallel: int = 2,
                 rung_steps: int = 100, eta: int = 3, rungs: int = 3, queue_size: int = 16, children: int = 2,
                 perturb: Callable[[dict[str, Any], random.Random], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 previous: list[TrialRecord] | None = None, max_trials: int | None = None,
                 progress: Callable[[str], None] | None = None, progress_every: float = 10.0, seed: int = 0,
                 on_event: Callable[[dict[str, Any]], None] | None = None):
        if max_parallel < 1 or memory <= 0 or time_budget <= 0 or rungs < 1 or rung_steps < 1 or eta < 1:
            raise ValueError("explorer: need memory > 0, time > 0, max_parallel >= 1, rungs >= 1, rung_steps >= 1, "
                             "eta >= 1")
        self.runner, self.study, self.memory, self.time_budget = runner, study, memory, time_budget
        self.max_parallel, self.rung_steps = max_parallel, [rung_steps * eta ** r for r in range(rungs)]
        self.eta = eta
        self.queue, self.children, self.perturb = CandidateQueue(queue_size), children, perturb
        self.clock, self.sleep, self.max_trials = clock, sleep, max_trials
        self.progress, self.progress_every, self.rng = progress, progress_every, random.Random(seed)
        self.on_event = on_event
        self.records: dict[int, TrialRecord] = {r.trial: r for r in previous or []}
        self.running: dict[int, _Running] = {}
        self.events: list[dict[str, Any]] = []
        self.rung_prices: list[RungPrice] = []  # every rung reached with a price: predicted and measured seconds
        self.drawn = 0
        self._last_was_child = True  # the first start goes to the sampler
        self.times = RungTimes()
        for r in previous or []:  # an earlier session's trials calibrate the seconds per meta-step
            if r.rungs:
                self.times.observe(r.predicted_step_seconds, r.rungs[-1].meta_steps, r.rungs[-1].train_seconds)
        self.deadline = math.inf  # set by `run`

    # --- bookkeeping -------------------------------------------------------------------------------------------
    @property
    def share(self) -> int:
        return self.memory // self.max_parallel

    @property
    def running_predicted_bytes(self) -> int:
        """The running trials' predicted peaks, summed (what `events` records)."""
        return sum(r.candidate.predicted_peak_bytes or 0 for r in self.running.values())

    @property
    def reserved_bytes(self) -> int:
        """What the running trials hold for admission: each one's predicted peak, or its measured one once that
        is higher. At least `running_predicted_bytes`, so the predicted sum stays within `memory` too."""
        return sum(max(r.candidate.predicted_peak_bytes or 0, r.record.measured_peak_bytes)
                   for r in self.running.values())

    def _event(self, trial: int, event: str, **extra: Any) -> None:
        self.events.append({"time": round(self.clock() - self.started, 3), "trial": trial, "event": event,
                            "running_predicted_bytes": self.running_predicted_bytes,
                            "running_reserved_bytes": self.reserved_bytes, **extra})
        if self.on_event is not None:
            self.on_event(self.events[-1])

    def _finish(self, record: TrialRecord, status: str, error: str = "") -> None:
        record.status, record.error = status, error or record.error
        self.study.tell(record)
        if status in ("complete", "pruned") and record.rungs:
            self._breed(record)

    # --- the queue ---------------------------------------------------------------------------------------------
    def _push(self, candidate: Candidate) -> None:
        self.records.setdefault(candidate.trial, TrialRecord(candidate.trial, candidate.params, candidate.parent))
        dropped = self.queue.push(candidate)
        if dropped is not None:
            self._finish(self.records[dropped.trial], "pruned", "dropped from the full queue (lowest priority)")

    def _fill(self) -> None:
        free = self.max_parallel - len(self.running)
        while (len(self.queue) < self.queue.capacity
               and (len(self.queue) < free + 1 or not any(c.parent is None for c in self.queue))
               and (self.max_trials is None or self.drawn < self.max_trials)):
            trial, params = self.study.ask()
            self.drawn += 1
            self._push(Candidate(CandidateQueue.sampler_priority, params, trial))

    def _breed(self, record: TrialRecord) -> None:
        """Children of a trial that is on the front of every finished trial (priority: its rank, 0)."""
        if self.perturb is None or not self.children:
            return
        done = [r for r in self.records.values() if r.rungs and r.status in ("complete", "pruned", "running")]
        ranks = non_dominated_ranks([r.objectives() for r in done])
        rank = ranks[done.index(record)]
        if rank > 0:
            return
        for _ in range(self.children):
            if sum(c.parent is not None for c in self.queue) >= self.queue.capacity - 1:
                return  # one place stays for the sampler's next draw
            params = self.perturb(record.params, self.rng)
            trial = self.study.ask_child(params, record.trial, float(rank))
            self._push(Candidate(float(rank), params, trial, parent=record.trial))

    # --- admission and packing ---------------------------------------------------------------------------------
    def _ordered(self) -> list[Candidate]:
        """The queue in priority order, alternating sources: the sampler's draws and children."""
        fresh = [c for c in self.queue if c.parent is None]
        children = [c for c in self.queue if c.parent is not None]
        first, second = (fresh, children) if self._last_was_child else (children, fresh)
        merged = [c for pair in zip(first, second) for c in pair]
        return merged + first[len(second):] + second[len(first):]

    def _admit(self) -> None:
        for candidate in self._ordered():
            if len(self.running) >= self.max_parallel or self.clock() >= self.deadline:
                return  # (pricing takes time: the queue is not priced past the deadline)
            record = self.records[candidate.trial]
            if candidate.predicted_peak_bytes is None:
                priced = self.runner.price(candidate, self.share, record.excluded)
                if isinstance(priced, str):
                    self.queue.remove(candidate)
                    self._finish(record, "infeasible", priced)
                    continue
                price = Price(*priced)
                candidate.predicted_peak_bytes, candidate.estimator_chosen, candidate.predicted_step_seconds = price
                record.predicted_peak_bytes, record.estimator_chosen, record.predicted_step_seconds = price
            if self.clock() >= self.deadline:
                return  # (pricing it took past the deadline)
            late = self._first_rung_late(candidate)
            if late is not None:  # time left only shrinks: it will not fit later either; its place goes to a draw
                self.queue.remove(candidate)
                seconds, left = late
                self._event(candidate.trial, "late", predicted_seconds=round(seconds, 3))
                self._finish(record, "pruned", f"{NOT_STARTED_LATE} {seconds:.3g} s away with {left:.3g} s left")
                continue
            if self.reserved_bytes + candidate.predicted_peak_bytes <= self.memory:  # first fit
                self.queue.remove(candidate)
                self._last_was_child = candidate.parent is not None
                record.status = "running"
                self.running[candidate.trial] = _Running(
                    candidate, record, self.runner.start(candidate, self.rung_steps), self.clock(),
                    self.times.to_first_rung(candidate.predicted_step_seconds, self.rung_steps[0]))
                self._event(candidate.trial, "start", predicted_peak_bytes=candidate.predicted_peak_bytes,
                            estimator_chosen=candidate.estimator_chosen)

    def _first_rung_late(self, candidate: Candidate) -> tuple[float, float] | None:
        """(predicted seconds to its first rung, seconds left) where that rung is predicted to end past the deadline,
        else None (also without a prediction)."""
        seconds = self.times.to_first_rung(candidate.predicted_step_seconds, self.rung_steps[0])
        left = self.deadline - self.clock()
        if seconds is None or seconds < left:  # (at the deadline itself the trial would be stopped)
            return None
        return seconds, left

    def _next_rung_late(self, record: TrialRecord, rung: Rung) -> tuple[str | None, float]:
        """(why the trial stops at `rung`: its next one is predicted to end past the deadline, or None; the
        predicted wall-clock seconds to that next rung)."""
        steps = self.rung_steps[rung.level + 1]
        seconds = self.times.to_next_rung(record.measured_step_seconds, steps - rung.meta_steps,
                                          rung.validation_seconds)
        left = self.deadline - self.clock()
        if seconds < left:
            return None, seconds
        return (f"stopped at rung {rung.level}: {STOPPED_BEFORE_LATE_RUNG} ({steps} meta-steps) was predicted "
                f"{seconds:.3g} s away with {left:.3g} s left"), seconds

    # --- rungs -------------------------------------------------------------------------------------------------
    def _pruning_reason(self, record: TrialRecord, rung: Rung) -> str | None:
        """None if the trial continues: non-dominated among every trial's result at this rung and, past eta
        of them, among the ceil(n / eta) front members with the lowest validation loss."""
        peers = [r for r in self.records.values() if r.at(rung.level) is not None]
        points = [r.objectives(rung.level) for r in peers]
        ranks = non_dominated_ranks(points)
        if ranks[peers.index(record)] != 0:
            return f"dominated at rung {rung.level}"
        if len(peers) <= self.eta:
            return None
        front = sorted((i for i, r in enumerate(ranks) if r == 0), key=lambda i: points[i][0])
        quota = math.ceil(len(peers) / self.eta)
        place = front.index(peers.index(record))
        return None if place < quota else (f"outside the top {quota} of {len(peers)} at rung {rung.level} "
                                           f"(place {place + 1} of the front by validation loss)")

    def _stop(self, trial: int, status: str, error: str = "") -> None:
        running = self.running.pop(trial)
        self.runner.stop(running.handle)
        self._event(trial, "stop", status=status)
        self._finish(running.record, status, error)

    def _handle(self, trial: int, message: Message) -> None:
        running = self.running[trial]
        record = running.record
        if message.kind == "rung" and message.rung is not None:
            rung = message.rung
            if running.predicted_seconds is not None:
                self.rung_prices.append(RungPrice(not record.rungs, running.predicted_seconds,
                                                  self.clock() - running.since))
            self.times.observe(record.predicted_step_seconds, rung.meta_steps, rung.train_seconds,
                               self.clock() - running.since, record.rungs[-1].train_seconds if record.rungs else 0.0,
                               first=not record.rungs, validation_seconds=rung.validation_seconds)
            record.rungs.append(rung)
            if rung.level + 1 >= len(self.rung_steps):
                return  # its "done" follows
            reason = self._pruning_reason(record, rung)
            late, predicted = self._next_rung_late(record, rung) if reason is None else (None, None)
            if reason is not None:
                self._stop(trial, "pruned", reason)
            elif late is not None:
                self._stop(trial, "complete", late)
            else:
                self.runner.resume(running.handle)
                running.since, running.predicted_seconds = self.clock(), predicted
        elif message.kind == "done":
            self._stop(trial, "complete")
        elif message.kind == "error" and message.budget and record.retries < len(self.rung_steps):
            # A misprediction caught by the guard: the same trial, one step down the estimator ladder.
            self.running.pop(trial)
            self.runner.stop(running.handle)
            self._event(trial, "stop", status="retry")
            record.excluded.append(record.estimator_chosen)
            record.retries += 1
            record.status, record.error = "queued", f"retried down the estimator ladder after: {message.error}"
            record.rungs.clear()
            candidate = running.candidate
            candidate.predicted_peak_bytes = None
            self.queue.push(candidate)
        else:
            self._stop(trial, "failed", message.error or "the trial stopped without a result")

    def _poll(self) -> None:
        for trial in list(self.running):
            for message in self.runner.poll(self.running[trial].handle):
                if trial not in self.running:
                    break
                self._handle(trial, message)

    # --- the loop ----------------------------------------------------------------------------------------------
    def _status(self) -> str:
        done = [r for r in self.records.values() if r.status in ("complete", "pruned", "infeasible", "failed")]
        best = min((r.val_loss for r in self.records.values() if r.rungs), default=math.nan)
        left = self.time_budget - (self.clock() - self.started)
        return (f"trials done {len(done)}, running {len(self.running)}, queued {len(self.queue)}; memory "
                f"{self.reserved_bytes / 1e6:.0f}/{self.memory / 1e6:.0f} MB; {max(left, 0):.0f} s left; "
                f"best val_loss {best:.4g}")

    def run(self) -> list[TrialRecord]:
        """Explore until the deadline (or until the sampler's `max_trials` are all done); every trial's record."""
        self.started = self.clock()
        self.deadline, last_progress = self.started + self.time_budget, -math.inf
        while self.clock() < self.deadline:
            self._fill()
            self._admit()
            self._poll()
            if not self.running and not len(self.queue):
                break  # max_trials reached and all done
            if self.progress is not None and self.clock() - last_progress >= self.progress_every:
                self.progress(self._status())
                last_progress = self.clock()
            self.sleep(0.05)
        for trial in list(self.running):  # the deadline: their last rung counts
            status = "complete" if self.running[trial].record.rungs else "pruned"
            self._stop(trial, status, "" if status == "complete" else CUT)
        for candidate in list(self.queue):
            self.queue.remove(candidate)
            self._finish(self.records[candidate.trial], "pruned", "not started before the deadline")
        if self.progress is not None:
            self.progress(self._status())
        return sorted(self.records.values(), key=lambda r: r.trial)
