"""Planning a meta-gradient under a budget: predict its peak memory, choose chunks, choose an estimator.

Prediction measures the estimator itself on the task cut to a few inner steps
(probes at 2 and 8 steps, more for checkpointing) with `metaopt.memory`, and
extrapolates with the estimator's own growth law in T (`predict_peak_bytes`).
Probes run task by task and, where vmap is possible, on the whole batch, so the
prediction for a vmapped chunk of c tasks interpolates between the two: a
vmapped graph has as many autograd nodes as one task's, so it costs far less
than c separate tasks (measured: 25 sinusoid tasks at T=100 under vmap take
about 7x one task, not 25x).

The memory budget is the peak allowed while computing the meta-gradient of the
tasks that run at once: one vmapped chunk, or one task in a loop.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple, Sequence

import torch

from metaopt.batching import Batching, resolve_batching, stack_tasks, unstack_tasks
from metaopt.budget import Budget, BudgetExceeded
from metaopt.estimators import (
    AbstractEstimator,
    Checkpoint,
    EstimatorUnsupported,
    FirstOrder,
    ForwardMode,
    Full,
    Implicit,
    Truncated,
)
from metaopt.guard import format_bytes
from metaopt.loop import InnerLoop
from metaopt.memory import Method, measure_peak_memory
from metaopt.types import MetaParams, Task

__all__ = ["Plan", "Predictor", "Meter", "plan", "choose", "describe"]

Meter = Callable[[AbstractEstimator, "Task | list[Task]", str], int]


class Plan(NamedTuple):
    """How to compute one meta-gradient within a budget.

    Attributes:
      estimator: the estimator to call.
      batching: "vmap" or "loop".
      chunk_size: tasks per vmapped graph (1 with "loop").
      predicted_peak_bytes: predicted peak of one chunk (one task in a loop).
      task_peak_bytes: predicted peak of one task alone.
      reason: why this plan, in words.
    """

    estimator: AbstractEstimator
    batching: Literal["vmap", "loop"]
    chunk_size: int
    predicted_peak_bytes: int
    task_peak_bytes: int
    reason: str


def describe(estimator: AbstractEstimator) -> str:
    """`checkpoint(segment=10)`: the registry name and the constructor arguments."""
    args = ", ".join(f"{k}={v!r}" for k, v in vars(estimator).items() if not k.startswith("_") and k != "exact")
    return f"{estimator.name}({args})"


class Predictor:
    """Measures probes of estimators on one batch of tasks and predicts their peak memory.

    Measurements are cached per (estimator, steps, tasks at once), so planning
    several candidates on the same batch shares them.

    Args:
      loop, meta: the inner loop and meta-parameters.
      tasks: the batch of tasks to plan for (stacked, or a list).
      device: where the tasks run (selects the memory method).
      method: `metaopt.memory` method ("auto": allocator on CUDA, RSS on CPU).
      meter: replaces the measurement: `meter(estimator, tasks, batching) -> peak bytes`
        (tests inject a deterministic one).
    """

    def __init__(self, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                 device: torch.device | str = "cpu", method: Method = "auto", meter: Meter | None = None):
        self.loop, self.meta, self.device, self.method, self.meter = loop, meta, device, method, meter
        self.tasks = unstack_tasks(tasks) if isinstance(tasks, Task) else list(tasks)
        self.steps = self.tasks[0].inner_steps
        self._cache: dict[tuple[str, int, int], int] = {}
        self._warm: set[str] = set()

    def measure(self, estimator: AbstractEstimator, steps: int, n_tasks: int) -> int:
        """Peak bytes of one call of `estimator` on `n_tasks` tasks cut to `steps` inner steps."""
        key = (describe(estimator), steps, n_tasks)
        if key not in self._cache:
            cut = [t._replace(support=t.support[:steps]) for t in self.tasks[:n_tasks]]
            batch = stack_tasks(cut) if n_tasks > 1 else cut
            batching: Literal["vmap", "loop"] = "vmap" if n_tasks > 1 else "loop"
            if self.meter is not None:
                self._cache[key] = self.meter(estimator, batch, batching)
                return self._cache[key]
            if describe(estimator) not in self._warm:  # first calls pay one-off costs (kernels, forward-AD setup)
                warm = [t._replace(support=t.support[:min(steps, 2)]) for t in self.tasks[:1]]
                estimator(self.loop, self.meta, warm, batching="loop")
                self._warm.add(describe(estimator))
            with measure_peak_memory(self.device, self.method) as memory:
                estimator(self.loop, self.meta, batch, batching=batching)
            self._cache[key] = memory.peak_bytes
        return self._cache[key]

    def predict(self, target: AbstractEstimator, n_tasks: int = 1, steps: int | None = None) -> int:
        """Predicted peak bytes of `target` at T = `steps` (default: the tasks') on `n_tasks` at once."""
        def measure(steps: int, estimator: AbstractEstimator | None = None) -> int:
            return self.measure(estimator if estimator is not None else target, steps, n_tasks)
        return target.predict_peak_bytes(measure, self.steps if steps is None else steps)


def _fit(predictor: Predictor, estimator: AbstractEstimator, budget: Budget, batching: Batching) -> Plan | None:
    """The plan with the largest vmapped chunk that fits the memory budget, or None if nothing fits."""
    n = len(predictor.tasks)
    task_bytes = predictor.predict(estimator, 1)
    limit = budget.memory if budget.memory is not None else math.inf
    if task_bytes > limit:
        return None  # a vmapped chunk costs at least one task
    mode, _ = resolve_batching(predictor.tasks, batching, estimator.vmap_blocker(predictor.loop))
    if mode == "vmap" and n > 1:
        batch_bytes = predictor.predict(estimator, n)
        if batch_bytes <= limit:
            return Plan(estimator, "vmap", n, batch_bytes, task_bytes, f"all {n} tasks fit in one vmapped graph")
        per_extra_task = max(batch_bytes - task_bytes, 0) / (n - 1)
        chunk = int((limit - task_bytes) // per_extra_task) + 1 if per_extra_task > 0 else n
        if chunk >= 2:
            predicted = int(task_bytes + per_extra_task * (chunk - 1))
            return Plan(estimator, "vmap", chunk, predicted, task_bytes,
                        f"{n} tasks at once would take {format_bytes(batch_bytes)}; vmapped chunks of {chunk} fit")
    if task_bytes <= limit:
        why = "one task at a time fits" if mode == "vmap" else "tasks run one at a time"
        return Plan(estimator, "loop", 1, task_bytes, task_bytes, why)
    return None


def _alternatives(loop: InnerLoop, meta: MetaParams, steps: int) -> list[AbstractEstimator]:
    """Memory-saving estimators to try, most exact first."""
    root = max(1, math.ceil(math.sqrt(steps)))
    candidates: list[AbstractEstimator] = [Checkpoint(segment=s) for s in sorted({root, max(1, root // 2), 2 * root})
                                           if s < steps]
    candidates += [Implicit(), ForwardMode()]
    if set(meta.keys()) != {"init"}:  # an initialization alone gets zero gradient from any truncation k < T
        candidates += [Truncated(k=k) for k in sorted({max(1, steps // d) for d in (2, 4, 8, 16, 64)}, reverse=True)
                       if k < steps]
    candidates.append(FirstOrder())
    usable = []
    for c in candidates:
        try:
            c.check(loop, meta)
            usable.append(c)
        except EstimatorUnsupported:
            pass
    return usable


def plan(estimator: AbstractEstimator, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
         budget: Budget, *, batching: Batching = "auto", device: torch.device | str = "cpu",
         meter: Meter | None = None) -> Plan:
    """Predict `estimator`'s peak memory on these tasks and fit it to the budget.

    Raises:
      BudgetExceeded: not even one task fits; the message names the estimator, T, the
        predicted and the allowed bytes, and the configurations that would fit.
    """
    estimator.check(loop, meta)
    predictor = Predictor(loop, meta, tasks, device, meter=meter)
    found = _fit(predictor, estimator, budget, batching)
    if found is not None:
        return found
    task_bytes = predictor.predict(estimator, 1)
    fits = []
    for other in _alternatives(loop, meta, predictor.steps):
        predicted = predictor.predict(other, 1)
        if budget.memory is not None and predicted <= budget.memory:
            fits.append(f"{describe(other)} fits: {format_bytes(predicted)} predicted")
            if len(fits) == 3:
                break
    hint = "; ".join(fits) if fits else "no estimator fits: raise the budget or lower inner_steps"
    raise BudgetExceeded(
        f"{describe(estimator)} at T={predictor.steps} predicts {task_bytes} bytes ({format_bytes(task_bytes)}) "
        f"for one task > memory budget {budget.memory} bytes ({format_bytes(budget.memory or 0)}); {hint}")


def choose(loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task], budget: Budget, *,
           batching: Batching = "auto", device: torch.device | str = "cpu", meter: Meter | None = None) -> Plan:
    """The cheapest exact estimator that fits, else the least-biased approximation that fits.

    Order: full; checkpoint with the segment size of smallest predicted memory;
    implicit, then exact forward mode, where they serve the meta-parameters;
    then truncated with the largest k that fits; then first_order.

    Raises:
      BudgetExceeded: nothing fits (names what was tried).
    """
    predictor = Predictor(loop, meta, tasks, device, meter=meter)
    steps = predictor.steps
    tried = []
    full = _fit(predictor, Full(), budget, batching)
    if full is not None:
        return full._replace(reason=f"full fits ({full.reason})")
    tried.append(f"full: {format_bytes(predictor.predict(Full(), 1))}")
    alternatives = _alternatives(loop, meta, steps)
    checkpoints = sorted((predictor.predict(c, 1), c.segment, c) for c in alternatives if isinstance(c, Checkpoint))
    ordered = [c for _, _, c in checkpoints] + [c for c in alternatives if isinstance(c, (Implicit, ForwardMode))]
    truncations = [c for c in alternatives if isinstance(c, Truncated)]  # largest k first
    for candidate in ordered + truncations + [c for c in alternatives if isinstance(c, FirstOrder)]:
        found = _fit(predictor, candidate, budget, batching)
        if found is not None:
            kind = "exact" if candidate.exact else "approximate"
            return found._replace(reason=f"full predicts {tried[0].split(': ')[1]} > budget "
                                         f"{format_bytes(budget.memory or 0)}; {describe(candidate)} is the first "
                                         f"{kind} estimator that fits ({found.reason})")
        tried.append(f"{describe(candidate)}: {format_bytes(predictor.predict(candidate, 1))}")
    raise BudgetExceeded(f"no estimator fits the memory budget {format_bytes(budget.memory or 0)} at T={steps} "
                         f"(predicted per task: {'; '.join(tried)})")
