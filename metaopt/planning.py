"""Planning a meta-gradient under a budget: fit an estimator's chunks to it, or choose an estimator (`auto`).

A plan's prediction is the peak of the meta-gradient call as it will run (every
chunk in sequence, forward and backward; `metaopt.prediction`), plus the bytes the
caller adds around it (`fixed_bytes`: the outer optimizer's state). A plan is
emitted only when that prediction is at most `(1 - budget.headroom) x
budget.memory`; the reason says so.

Under `batching="auto"` a vmapped plan that fits is then *timed* against one task at
a time on the same tasks (`Predictor.seconds`, at up to 16 inner steps), and the
loop is planned where it is measured `LOOP_FASTER` (1.2) x faster and fits: memory
decides what may run, measured time which of those runs. The same holds for an estimator's repetitions per
pass left to the planner (`AbstractEstimator.pass_variants`: forward's tangents, ES's particles): one per pass,
or the most in one pass that fits (all of them, else the largest doubling that fits) where that is measured
`LOOP_FASTER` x faster. An explicit `batching`,
a compiled estimator, or a stand-in `meter` without a `timer` plan by memory alone (one per pass); under a time
budget a compiled estimator's chunk is timed compiled (`Predictor.compiled_seconds`).

Chunk sizes start from an interpolation between one task and the whole batch
under vmap (a vmapped graph has as many autograd nodes as one task's, so a chunk
of c tasks costs far less than c tasks: measured, 25 sinusoid tasks at T=100 take
about 7x one task), and each candidate chunk is then *measured* as the whole
chunked call before it is accepted.

Under a time budget (`Budget.time`: per task, or per batched chunk, which shares one clock) the planned chunk
is then *timed* at a few inner steps and its seconds at T predicted (`Predictor.predict_seconds`); chunks shrink
until one is predicted under `(1 - headroom) x time`. Where one task alone is not, the estimator is refused
(`on_exceed="raise"`) or planned with its reason saying that the guard will truncate or skip.

`auto` is a planning policy, not an estimator: it ranks the configurations that
the registered estimators declare (`AbstractEstimator.auto_candidates`) by their
declared bias, then relative time, then predicted memory, and plans the first
that fits (memory and time). Adding an estimator adds its candidates here without any change.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, ClassVar, Literal, NamedTuple, Sequence, cast

import torch

from metaopt.batching import Batching
from metaopt.budget import Budget, BudgetExceeded, TimeBudgetExceeded, machine_bounded
from metaopt.estimators.base import (
    AbstractEstimator,
    EstimatorUnsupported,
    MetaGrad,
    MetaGradientMethod,
    register,
    registered_estimators,
)
from metaopt.guard import format_bytes
from metaopt.loop import InnerLoop
from metaopt.prediction import Meter, Predictor, Timer, describe
from metaopt.runner import resolve_for
from metaopt.types import MetaParams, Task

__all__ = ["Plan", "Predictor", "Meter", "Timer", "Auto", "plan", "choose", "describe", "ranked_candidates"]


class Plan(NamedTuple):
    """How to compute one meta-gradient within a budget.

    Attributes:
      estimator: the estimator to call.
      batching: "stacked", "vmap" or "loop".
      chunk_size: tasks per vectorized graph (1 with "loop").
      predicted_peak_bytes: predicted peak of the whole call (all chunks) plus `fixed_bytes`.
      task_peak_bytes: predicted peak of one task alone.
      reason: why this plan, in words.
      predicted_chunk_seconds: predicted wall-clock seconds of one chunk (of one task with "loop"), what a
        time budget bounds (a compiled estimator's: measured compiled at T); None where the budget sets no time
        (nothing is timed for it).
      predicted_call_seconds: approximate wall-clock seconds of the whole call (every chunk) at T, from the calls
        that measured its memory, timed once each (`Predictor.probed_seconds`): free, rougher than
        `predicted_chunk_seconds`, for comparing configurations (the explorer calibrates it by the trials it ran).
        None where nothing was timed (a stand-in meter); for a compiled estimator, its chunks' seconds measured
        compiled under a time budget, else None (its memory probes run eager).
    """

    estimator: AbstractEstimator
    batching: Literal["stacked", "vmap", "loop"]
    chunk_size: int
    predicted_peak_bytes: int
    task_peak_bytes: int
    reason: str
    predicted_chunk_seconds: float | None = None
    predicted_call_seconds: float | None = None


LOOP_FASTER = 1.2
"""The planner leaves vmap for one task at a time only where the latter's measured call is this many times
faster: a margin over timing noise, so that near ties keep the vmapped plan (one dispatch per chunk)."""


def _limit(budget: Budget) -> float:
    return math.inf if budget.memory is None else (1 - budget.headroom) * budget.memory


def _limit_words(budget: Budget) -> str:
    return (f"{format_bytes(_limit(budget))} = {1 - budget.headroom:.0%} of the budget "
            f"{format_bytes(budget.memory or 0)}")


def _fit(predictor: Predictor, estimator: AbstractEstimator, budget: Budget, batching: Batching,
         fixed_bytes: int) -> Plan | None:
    """The plan with the largest vmapped chunk whose whole call fits under the headroom (under
    `batching="auto"`: unless one task at a time fits and is measured faster, `_faster_of`), or None."""
    n, limit = len(predictor.tasks), _limit(budget) - fixed_bytes
    mode, _ = resolve_for(estimator, predictor.loop, predictor.meta, predictor.tasks, batching)
    task_bytes = predictor.predict(estimator, 1)
    if task_bytes > limit:
        return None  # a vmapped chunk costs at least one task

    def made(batching: Literal["stacked", "vmap", "loop"], chunk: int, predicted: int, why: str) -> Plan:
        total = predicted + fixed_bytes
        if budget.memory is not None:
            why += f"; predicted {format_bytes(total)} <= {_limit_words(budget)}"
        return Plan(estimator, batching, chunk, total, task_bytes, why)

    # A compiled estimator (`metaopt.compiled`, as the runner tells it: `chunk_gradient`) computes vmapped chunks
    # only: for it, one task at a time is a vmap of one task.
    compiled = getattr(estimator, "chunk_gradient", None) is not None
    if mode != "loop" and n > 1:
        vmapped = _fit_vmapped(predictor, estimator, limit, task_bytes, _word(mode))
        if vmapped is not None:
            chunk, predicted, why = vmapped
            if batching != "auto" or compiled or not predictor.can_time:
                return made(mode, chunk, predicted, why)
            return _faster_of(predictor, estimator, limit, made, mode, vmapped)
    predicted = predictor.predict(estimator, n, 1)
    if predicted <= limit:
        reason = "one task at a time fits" if mode != "loop" else "tasks run one at a time"
        return made(mode if mode != "loop" and compiled else "loop", 1, predicted, reason)
    return None


def _word(mode: str) -> str:
    """How a plan's reason names a batched graph: "stacked" or "vmapped"."""
    return "stacked" if mode == "stacked" else "vmapped"


def _fit_vmapped(predictor: Predictor, estimator: AbstractEstimator, limit: float,
                 task_bytes: int, word: str = "vmapped") -> tuple[int, int, str] | None:
    """(chunk, predicted bytes, why) of the largest batched chunk (>= 2 tasks) whose whole call fits, or None;
    `word` names the batched form in the reason."""
    n = len(predictor.tasks)
    whole = predictor.predict(estimator, n, n)
    if whole <= limit:
        return n, whole, f"all {n} tasks fit in one {word} graph"
    per_extra_task = max(whole - task_bytes, 0) / (n - 1)
    chunk = n - 1 if per_extra_task == 0 else min(n - 1, int((limit - task_bytes) // per_extra_task) + 1)
    while chunk >= 2:  # measure the whole chunked call; shrink until it fits
        predicted = predictor.predict(estimator, n, chunk)
        if predicted <= limit:
            return chunk, predicted, f"{n} tasks at once would take {format_bytes(whole)}; {word} chunks of {chunk} fit"
        chunk = min(chunk - 1, int(chunk * limit / predicted))
    return None


def _faster_of(predictor: Predictor, estimator: AbstractEstimator, limit: float,
               made: Callable[[Literal["stacked", "vmap", "loop"], int, int, str], Plan],
               mode: Literal["stacked", "vmap"], vmapped: tuple[int, int, str]) -> Plan:
    """The vmapped plan, or one task at a time where that is measured `LOOP_FASTER` x faster and fits.

    A vmapped graph is usually the fast way (one dispatch for every task), but not always: on the CPU a
    vmapped convolution over per-task weights becomes a grouped convolution whose double backward is slower
    than the tasks' separate ones (`experiments/bench_conv4.py`: MAML conv4 20-way, 1.8x). Timed, not assumed."""
    chunk, predicted, why = vmapped
    n = len(predictor.tasks)
    (vmap_s, loop_s), steps = predictor.seconds(estimator, n, (chunk, 1))
    timed = (f"{vmap_s:.3g} s {_word(mode)} vs {loop_s:.3g} s one task at a time, measured on the {n} tasks at "
             f"{steps} inner step{'s' if steps != 1 else ''}")
    if loop_s * LOOP_FASTER <= vmap_s:
        looped = predictor.predict(estimator, n, 1)
        if looped <= limit:
            return made("loop", 1, looped, f"one task at a time is faster ({timed}); it fits")
        why += f" (one task at a time was faster, {timed}, but does not fit)"
        return made(mode, chunk, predicted, why)
    return made(mode, chunk, predicted, f"{why}; {timed}")


def ranked_candidates(method: MetaGradientMethod, loop: InnerLoop, meta: MetaParams, steps: int,
                      predictor: Predictor) -> list[AbstractEstimator]:
    """`method`'s candidates that serve this loop and meta, most exact first, then fastest, then smallest."""
    usable = []
    for candidate in method.candidates(loop, meta, steps):
        try:
            candidate.check(loop, meta)
            usable.append(candidate)
        except EstimatorUnsupported:
            pass

    def declared(c: AbstractEstimator) -> tuple[float, float]:
        return c.bias(steps), c.relative_time

    ranked: list[AbstractEstimator] = []
    for _, group in itertools.groupby(sorted(usable, key=declared), key=declared):
        same = list(group)  # equally exact and fast (checkpoint segments): the smallest first
        ranked += same if len(same) == 1 else sorted(same, key=lambda c: predictor.predict(c, 1))
    return ranked


def plan(method: MetaGradientMethod, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
         budget: Budget, *, batching: Batching = "auto", device: torch.device | str = "cpu",
         meter: Meter | None = None, fixed_bytes: int = 0, timer: Timer | None = None) -> Plan:
    """Predict the peak memory (and under a time budget, a chunk's seconds) of `method` on these tasks and fit it
    to the budget.

    For an estimator: its largest vmapped chunks that fit (under `batching="auto"`, one task at a time instead
    where that fits and is measured `LOOP_FASTER` x faster). For a policy such as `auto`: the
    first of its ranked candidates that fits. Without a memory budget, the plan still fits the
    memory available on `device` now (`metaopt.memory.available_bytes`; the reason says so): a
    run past it would be killed, leaving no record. No run-time guard follows from that bound.

    Args:
      fixed_bytes: bytes the caller adds around the call (e.g. the outer optimizer's state),
        added to every prediction.
      timer: replaces the timing of vmapped chunks against one task at a time (`metaopt.prediction.Timer`);
        with a `meter` and no `timer`, nothing is timed and the largest vmapped chunk that fits is planned.

    Raises:
      BudgetExceeded: nothing fits; the message names the estimator, T, the predicted and the
        allowed bytes (or seconds), and (for one estimator) the configurations that would fit.
    """
    bounded, room = machine_bounded(budget, device)
    if room is None:
        return _plan_within(method, loop, meta, tasks, budget, batching, device, meter, fixed_bytes, timer)
    machine = f"no memory budget was given: the plan fits the {format_bytes(room)} available on {torch.device(device)}"
    try:
        found = _plan_within(method, loop, meta, tasks, bounded, batching, device, meter, fixed_bytes, timer)
    except TimeBudgetExceeded:
        raise  # it fits the machine's memory
    except BudgetExceeded as refused:
        raise BudgetExceeded(f"{machine}; nothing fits in it: {refused}") from None
    return found._replace(reason=f"{found.reason}; {machine}")


def _plan_within(method: MetaGradientMethod, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                 budget: Budget, batching: Batching, device: torch.device | str, meter: Meter | None,
                 fixed_bytes: int, timer: Timer | None = None) -> Plan:
    """`plan` under `budget` as given."""
    method.check(loop, meta)
    predictor = Predictor(loop, meta, tasks, device, meter=meter, limit=_limit(budget), timer=timer,
                          batching=batching)
    steps = predictor.steps
    candidates = ranked_candidates(method, loop, meta, steps, predictor)
    tried: list[str] = []
    over_time: Plan | None = None  # the first plan that fits the memory but is predicted past the time budget
    for listed in candidates:
        variants = listed.pass_variants(loop, meta) if isinstance(listed, AbstractEstimator) else []
        candidate = variants[0] if variants else listed  # (the fewest repetitions per pass: the least memory)
        found = _fit(predictor, candidate, budget, batching, fixed_bytes)
        if found is not None and len(variants) > 1 and batching == "auto" and predictor.can_time:
            found = _fastest_pass(predictor, found, variants[1:], budget, fixed_bytes)
        if found is not None:
            found, overrun = _fit_time(predictor, found, budget, fixed_bytes)
            found = _with_call_seconds(predictor, found)
            if overrun is None:
                if listed is candidates[0]:
                    return found
                kind = "exact" if candidate.exact else "approximate"
                return found._replace(reason=f"{tried[0]}; {describe(candidate)} is the first {kind} estimator that "
                                             f"fits ({found.reason})")
            over_time = over_time or found
            tried.append(overrun)
            continue
        tried.append(f"{describe(candidate)} predicts {format_bytes(predictor.predict(candidate, 1) + fixed_bytes)} "
                     f"> {_limit_words(budget)}")
    if over_time is not None and budget.on_exceed != "raise":
        return over_time  # its reason says the guard will truncate or skip
    if len(candidates) == 1 and over_time is not None:
        raise TimeBudgetExceeded(f"{tried[0]} (`auto` plans the first estimator that fits memory and time; "
                                 "on_exceed=truncate runs this one cut short; or raise the time budget, or lower "
                                 "inner_steps)")
    if len(candidates) == 1:
        raise BudgetExceeded(_refusal(candidates[0], loop, meta, budget, predictor, fixed_bytes))
    limits = f"memory budget {format_bytes(budget.memory or 0)}" if budget.time is None else \
        f"budget ({format_bytes(budget.memory or 0) if budget.memory else 'no memory limit'}, {budget.time:.3g} s)"
    raise BudgetExceeded(f"no estimator fits the {limits} at T={steps} (per task: {'; '.join(tried)})")


def _fastest_pass(predictor: Predictor, found: Plan, others: list[AbstractEstimator], budget: Budget,
                  fixed_bytes: int) -> Plan:
    """`found` (one repetition per pass), or the most per pass of `others` (`pass_variants`, fewest first) that fits,
    where it is measured `LOOP_FASTER` x faster than `found`, both timed as they would run (their own chunks and
    batching) on the batch at a few inner steps. Only the largest count that fits is timed: more per pass shares
    the per-op cost among more repetitions, so where all of them do not fit the largest doubling that does is the
    candidate (before, one per pass ran there)."""
    n = len(predictor.tasks)
    option = cast(str, found.estimator.per_pass)  # (it has variants)
    larger, unfit = None, []
    for other in reversed(others):
        larger = _fit(predictor, other, budget, "auto", fixed_bytes)
        if larger is not None:
            break
        unfit.append(getattr(other, option))
    words = f"; {', '.join(map(str, unfit))} per pass do{'es' if len(unfit) == 1 else ''} not fit" if unfit else ""
    if larger is None:
        return found._replace(reason=f"{found.reason}; {option}=1: more per pass does not fit")
    (one, more), steps = predictor.seconds_of([(p.estimator, p.chunk_size) for p in (found, larger)], n)
    chosen = larger if more * LOOP_FASTER <= one else found
    count = getattr(chosen.estimator, option)
    timed = f"1 per pass {one:.3g} s, {getattr(larger.estimator, option)} per pass {more:.3g} s"
    return chosen._replace(reason=f"{chosen.reason}; {option}={count} ({timed}, measured on the {n} tasks at {steps} "
                                  f"inner step{'s' if steps != 1 else ''}{words})")


def _with_call_seconds(predictor: Predictor, found: Plan) -> Plan:
    """`found` with its call's seconds as its memory probes timed them; for a compiled estimator, its chunks' timed
    seconds (under a time budget: `_fit_time`), else none (its memory probes ran eager)."""
    if getattr(found.estimator, "chunk_gradient", None) is not None:
        if found.predicted_chunk_seconds is None:
            return found
        chunks = -(-len(predictor.tasks) // found.chunk_size)
        return found._replace(predicted_call_seconds=found.predicted_chunk_seconds * chunks)
    seconds = predictor.probed_seconds(found.estimator, len(predictor.tasks), found.chunk_size)
    return found._replace(predicted_call_seconds=seconds)


def _fit_time(predictor: Predictor, found: Plan, budget: Budget, fixed_bytes: int) -> tuple[Plan, str | None]:
    """`found` with its chunk's predicted seconds, its chunks made smaller where one would run past the time budget
    (a chunk shares one clock) less its headroom, and None; or, where even one task alone is predicted past it, the
    plan and why (the guard would truncate or skip every chunk, or raise). Unchanged where the budget sets no time or
    nothing can be timed (a stand-in meter). A compiled estimator's chunk is timed compiled at T
    (`Predictor.compiled_seconds`: compiled once, as training's first step would, and kept), not predicted from
    eager timings, which would overstate it; where it falls back to eager, as eager."""
    if budget.time is None or not predictor.can_time:
        return found, None
    estimator, chunk, n = found.estimator, found.chunk_size, len(predictor.tasks)
    compiled = getattr(estimator, "chunk_gradient", None) is not None
    limit = (1 - budget.headroom) * budget.time
    words = f"{limit:.3g} s = {1 - budget.headroom:.0%} of the time budget {budget.time:.3g} s"

    def seconds_of(chunk: int) -> tuple[float, str]:
        measured = predictor.compiled_seconds(estimator, chunk) if compiled else None
        if measured is not None:
            return measured, "measured compiled at T"
        return predictor.predict_seconds(estimator, chunk), "predicted"
    seconds, how = seconds_of(chunk)
    first = seconds
    while seconds > limit and chunk > 1:
        chunk = max(1, min(chunk - 1, int(chunk * limit / seconds)))
        seconds, how = seconds_of(chunk)
    unit = "one task" if chunk == 1 else f"a chunk of {chunk} tasks"
    timed = f"{unit} {how} {seconds:.3g} s {'>' if seconds > limit else '<='} {words}"
    if chunk != found.chunk_size:
        batching = found.batching if chunk > 1 or compiled else "loop"
        predicted = predictor.predict(estimator, n, chunk) + fixed_bytes
        reason = (f"{found.reason}; but chunks of {found.chunk_size} tasks {how} {first:.3g} s each: {batching} "
                  f"chunks of {chunk}, predicted {format_bytes(predicted)}")
        found = found._replace(batching=batching, chunk_size=chunk, reason=reason, predicted_peak_bytes=predicted)
    found = found._replace(predicted_chunk_seconds=seconds, reason=f"{found.reason}; {timed}")
    if seconds <= limit:
        return found, None
    action = {"truncate": "its unroll will be truncated", "skip": "its tasks will be skipped"}.get(budget.on_exceed)
    overrun = f"{describe(estimator)} at T={predictor.steps}: {timed}"
    return found._replace(reason=f"{found.reason}: {action} at run time (on_exceed={budget.on_exceed})"
                          if action else found.reason), overrun


def _refusal(estimator: AbstractEstimator, loop: InnerLoop, meta: MetaParams, budget: Budget, predictor: Predictor,
             fixed_bytes: int) -> str:
    task_bytes = predictor.predict(estimator, 1) + fixed_bytes
    fits = []
    for other in ranked_candidates(Auto(), loop, meta, predictor.steps, predictor):
        predicted = predictor.predict(other, 1) + fixed_bytes
        if predicted <= _limit(budget) and describe(other) != describe(estimator):
            fits.append(f"{describe(other)} fits: {format_bytes(predicted)} predicted")
            if len(fits) == 3:
                break
    hint = "; ".join(fits) if fits else "no estimator fits: raise the budget or lower inner_steps"
    return (f"{describe(estimator)} at T={predictor.steps} predicts {task_bytes} bytes ({format_bytes(task_bytes)}) "
            f"for one task > memory budget {budget.memory} bytes ({_limit_words(budget)}); {hint}")


def choose(loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task], budget: Budget, *,
           batching: Batching = "auto", device: torch.device | str = "cpu", meter: Meter | None = None,
           fixed_bytes: int = 0, timer: Timer | None = None) -> Plan:
    """`plan(Auto(), ...)`: the most exact, then fastest, estimator that fits."""
    return plan(Auto(), loop, meta, tasks, budget, batching=batching, device=device, meter=meter,
                fixed_bytes=fixed_bytes, timer=timer)


@register("auto")
class Auto:
    """The planning policy `auto`: the most exact, then fastest, estimator that fits the budget (memory and time).

    Its candidates are every registered estimator's `auto_candidates` (full; checkpoint
    with segments around sqrt(T); exact forward mode and implicit where they serve the
    meta-parameters; truncated with k = T/2 ... T/64; first_order), ranked by declared
    bias, then relative time, then predicted memory. Without a memory budget: full.
    Training plans it like any estimator (`plan`). Called directly, it plans at the first
    call for a given number of tasks and inner steps and reports the choice in every
    result's stats ("estimator_chosen", "choice_reason", "predicted_peak_bytes").
    """

    name: ClassVar[str] = "auto"
    exact = False  # what it runs may be approximate; the plan says which

    def __init__(self, meter: Meter | None = None, timer: Timer | None = None) -> None:
        self.meter, self.timer = meter, timer  # replace the planner's measurement when called directly (tests)
        self._plans: dict[tuple[int, int, Budget, str], Plan] = {}

    def check(self, loop: InnerLoop, meta: MetaParams) -> None:
        loop.check(meta)

    def candidates(self, loop: InnerLoop, meta: MetaParams, steps: int) -> list[AbstractEstimator]:
        return [c for cls in registered_estimators() for c in cls.auto_candidates(loop, meta, steps)]

    def __call__(self, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                 budget: Budget | None = None, *, batching: Batching = "auto", chunk_size: int | None = None,
                 clock: Callable[[], float] | None = None,
                 memory_probe: Callable[[], int] | None = None) -> MetaGrad:
        budget = budget if budget is not None else Budget()
        n = tasks.query.x.shape[0] if isinstance(tasks, Task) else len(tasks)
        steps = tasks.inner_steps if isinstance(tasks, Task) else tasks[0].inner_steps
        key = (n, steps, budget, batching)
        if key not in self._plans:
            self._plans[key] = plan(self, loop, meta, tasks, budget, batching=batching, meter=self.meter,
                                    timer=self.timer)
        chosen = self._plans[key]
        result = chosen.estimator(loop, meta, tasks, budget, batching=chosen.batching, chunk_size=chosen.chunk_size,
                                  clock=clock, memory_probe=memory_probe)
        result.stats.update({"estimator_chosen": chosen.estimator.name, "choice_reason": chosen.reason,
                             "predicted_peak_bytes": chosen.predicted_peak_bytes})
        return result

    def arguments(self) -> dict[str, object]:
        """Its constructor's arguments (what `describe` prints, as for an estimator)."""
        return {"meter": self.meter, "timer": self.timer}

    def __repr__(self) -> str:
        return "Auto()"
