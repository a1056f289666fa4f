"""The estimator interface, `MetaGrad`, and the registry by name.

An estimator is one way of differentiating (or not) the same unrolled
composition `outer_loss(step^T(init(meta)))`. Each one defines, for one task,
a `TaskObjective`: a scalar *surrogate* whose gradient with respect to the
meta-parameters is that estimator's meta-gradient (for `full`, the outer loss
itself), and the outer loss for reporting. The base class then runs a batch of
tasks under `torch.func.vmap` (one graph for all tasks) or in a loop (one task
graph at a time, less memory) and returns a `MetaGrad`. Estimators have no side
effects: only the training loop writes `.grad`.

This package never imports `metaopt.metaparams`.
"""
from __future__ import annotations

import abc
import time
from typing import Callable, ClassVar, NamedTuple, Protocol, Sequence, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from metaopt.batching import Batching, compress_support, resolve_batching, task_count, vmap_tasks
from metaopt.budget import Budget
from metaopt.guard import StepGuard, TaskSkipped, UnrollTruncated
from metaopt.loop import InnerLoop
from metaopt.memory import current_bytes
from metaopt.types import MetaParams, Task

__all__ = [
    "MetaGrad",
    "TaskObjective",
    "AbstractEstimator",
    "EstimatorUnsupported",
    "UnknownEstimator",
    "register",
    "get_estimator",
    "available_estimators",
    "grads_of",
    "meta_values",
    "call_with_meta",
    "linear_surrogate",
]


class Measure(Protocol):
    """Measured peak bytes of an estimator (default: the one predicting) on the task cut to `steps` steps."""

    def __call__(self, steps: int, estimator: "AbstractEstimator | None" = None) -> int: ...


class MetaGrad(NamedTuple):
    """What an estimator returns.

    Attributes:
      grads: one tensor per meta-parameter, keyed like `meta.named_parameters()`
        (zeros for meta-parameters the outer loss does not depend on); the mean
        over the batch of tasks.
      outer_loss: mean outer loss over the tasks (detached, a scalar).
      stats: "seconds" (wall-clock of the call), "tasks", "batching", and
        estimator-specific figures.
      task_losses: each task's outer loss, [B] (NaN for skipped tasks).
      task_used: bool [B], False for tasks skipped under the budget.
    """

    grads: dict[str, Tensor]
    outer_loss: Tensor
    stats: dict[str, float | int | str]
    task_losses: Tensor | None = None
    task_used: Tensor | None = None


class TaskObjective(NamedTuple):
    """One task's contribution.

    Attributes:
      surrogate: a scalar whose gradient w.r.t. the meta-parameters is the
        estimator's meta-gradient for this task.
      outer_loss: the task's outer loss (for reporting; may equal `surrogate`).
      stats: scalar tensors to report (e.g. a solver residual); averaged over tasks,
        and their maximum reported as "<name>_max".
    """

    surrogate: Tensor
    outer_loss: Tensor
    stats: dict[str, Tensor] = {}


class EstimatorUnsupported(ValueError):
    """An estimator cannot serve this inner loop or meta-parameter kind."""


class UnknownEstimator(ValueError):
    """No estimator is registered under this name."""


def linear_prediction(measure: Measure, steps: int, low: int, high: int,
                      estimator: AbstractEstimator | None = None) -> int:
    """measure(steps) if steps <= high, else the line through the probes at `low` and `high` steps."""
    if steps <= high:
        return measure(steps, estimator)
    at_low, at_high = measure(low, estimator), measure(high, estimator)
    return int(at_high + max(at_high - at_low, 0) * (steps - high) / (high - low))


def _truncate_tasks(prepared: Task | list[Task], first: int, last: int, steps: int,
                    mode: str) -> Task | list[Task]:
    """Cut tasks first..last-1 to their first `steps` inner steps (a stacked batch is cut whole)."""
    if isinstance(prepared, Task):
        return prepared._replace(support=prepared.support[:steps])
    return [t._replace(support=t.support[:steps]) if first <= i < last else t for i, t in enumerate(prepared)]


class _MetaCall(nn.Module):
    def __init__(self, meta: MetaParams):
        super().__init__()
        self.meta = meta

    def forward(self, fn: Callable[..., object], *args: object) -> object:
        return fn(self.meta, *args)


def meta_values(meta: MetaParams) -> dict[str, Tensor]:
    """The meta-parameters that require grad, detached: the point at which estimates are taken."""
    return {k: p.detach() for k, p in meta.named_parameters() if p.requires_grad}


R = TypeVar("R")


def call_with_meta(meta: MetaParams, values: dict[str, Tensor], fn: Callable[..., R], *args: object) -> R:
    """`fn(meta, *args)` with the meta-parameters replaced by `values` (keyed like named_parameters).

    Uses `torch.func.functional_call`, so it composes with jvp and vmap; the module is not changed.
    """
    return cast(R, torch.func.functional_call(_MetaCall(meta), {f"meta.{k}": v for k, v in values.items()}, (fn, *args)))


def linear_surrogate(meta: MetaParams, grads: dict[str, Tensor]) -> Tensor:
    """sum_k <meta_k, grads_k.detach()>: a scalar whose gradient w.r.t. meta is `grads`."""
    params = dict(meta.named_parameters())
    return torch.stack([(params[k] * g.detach()).sum() for k, g in grads.items()]).sum()


def grads_of(loss: Tensor, meta: MetaParams) -> dict[str, Tensor]:
    """d loss / d meta for every meta-parameter that requires grad (zeros where unused)."""
    named = [(k, p) for k, p in meta.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("meta has no parameters that require grad: nothing to meta-learn")
    if not loss.requires_grad:  # no path from any meta-parameter (e.g. truncated before the only one used)
        return {k: torch.zeros_like(p) for k, p in named}
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(named, grads)}


class AbstractEstimator(abc.ABC):
    """A way of computing the meta-gradient of the outer loss.

    Subclasses define `task_objective` for one task and document, in their class
    docstring, what they compute, their memory and time in T, whether they are
    exact, and what they cannot serve.

    Class attributes:
      name: the registry name (set by `register`).
      exact: True if the meta-gradient equals full backprop's up to rounding.
      supports_vmap: whether `task_objective` may run under `torch.func.vmap`.
      second_order: whether it differentiates through inner gradients (then models
        with layers that PyTorch gets wrong under vmap run task by task).
    """

    name: ClassVar[str] = "?"
    exact: bool  # a class default; ForwardMode sets it per instance (exact or random mode)
    supports_vmap: ClassVar[bool] = True
    second_order: ClassVar[bool] = True

    def check(self, loop: InnerLoop, meta: MetaParams) -> None:
        """Raise `EstimatorUnsupported` (why, and what to use instead) before any work."""
        loop.check(meta)

    def vmap_blocker(self, loop: InnerLoop) -> str | None:
        """Why this estimator must not vmap over tasks with this loop, or None if it may."""
        if not self.supports_vmap:
            return f"estimator {self.name!r} cannot run under vmap"
        unsafe = loop.second_order_vmap_unsafe if self.second_order else []
        if unsafe:
            return (f"PyTorch computes second derivatives of {', '.join(unsafe)} wrongly under vmap "
                    "(functorch issue #534); use metaopt.models.BatchNorm, GroupNorm, or task-by-task batching")
        return None

    @abc.abstractmethod
    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        """The surrogate and outer loss of one task (no task axis).

        `guard` (None when unlimited) must be passed as `on_step` to every unroll.
        """

    def predict_peak_bytes(self, measure: Measure, steps: int) -> int:
        """Peak memory at T = `steps`, from `measure(t)`: the measured peak of this estimator at t steps
        (`measure(t, other)` measures another estimator instead).

        Default: linear in T (the cost of every estimator that keeps O(T) or O(1) graphs; even
        graph-free unrolls grow the process a little per step), from probes at 16 and 64 steps:
        wide apart, because the heap grows in coarse increments that swamp a slope measured
        over a few steps.
        """
        return linear_prediction(measure, steps, 16, 64)

    def __call__(self, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                 budget: Budget | None = None, *, batching: Batching = "auto", chunk_size: int | None = None,
                 clock: Callable[[], float] | None = None,
                 memory_probe: Callable[[], int] | None = None) -> MetaGrad:
        """The meta-gradient of the mean outer loss over a batch of tasks.

        Args:
          loop: the inner loop.
          meta: the meta-parameters.
          tasks: a stacked batch of tasks (leading task axis) or a list of tasks.
          budget: the per-task budget, enforced at inner-step boundaries by a `StepGuard`
            (None: unlimited, no guard). Up-front prediction is `metaopt.planning.plan`'s job.
          batching: "vmap" runs tasks in one vectorized graph (fast; memory grows with the
            tasks in it), "loop" one task graph at a time, "auto" vmap where tasks stack and
            the estimator allows it.
          chunk_size: under vmap, at most this many tasks per vectorized graph (None: all).
          clock, memory_probe: for the guard (defaults: time.monotonic and
            `metaopt.memory.current_bytes` on the tasks' device); injectable for tests.

        Returns:
          The mean over the tasks that were not skipped. `stats` has "seconds", "tasks",
          "batching", "chunk_size", "tasks_truncated", "tasks_skipped" and the estimator's own
          figures; `task_losses` has each task's outer loss (NaN for a skipped task).
        """
        budget = budget if budget is not None else Budget()
        self.check(loop, meta)
        start = time.perf_counter()
        mode, prepared = resolve_batching(tasks, batching, self.vmap_blocker(loop))
        if isinstance(prepared, Task):  # vmap
            total = task_count(prepared)
            size = total if chunk_size is None else max(1, min(chunk_size, total))
            units = [(i, min(i + size, total)) for i in range(0, total, size)]
            device = prepared.query.x.device
        else:
            total, size = len(prepared), 1
            units = [(i, i + 1) for i in range(total)]
            device = prepared[0].query.x.device
        probe = memory_probe if memory_probe is not None else (lambda: current_bytes(device))
        guard = None if budget.unlimited else StepGuard(budget, clock or time.monotonic, probe)

        def run(first: int, last: int, unit_guard: StepGuard | None) -> TaskObjective:
            def objective(task: Task) -> TaskObjective:
                return self.task_objective(loop, meta, task, unit_guard)
            if isinstance(prepared, Task):
                compressed, pattern = compress_support(prepared)
                return vmap_tasks(objective, tree_map_only(Tensor, lambda v: v[first:last], compressed),
                                  pattern)
            one = objective(prepared[first])
            return tree_map_only(Tensor, lambda v: v.unsqueeze(0), one)

        grads: dict[str, Tensor] | None = None
        task_losses = torch.full((total,), float("nan"))
        task_used = torch.zeros(total, dtype=torch.bool)
        stats_rows: list[dict[str, Tensor]] = []
        truncated = skipped = 0
        for first, last in units:
            if guard is not None:
                guard.what = f"task {first}" if last - first == 1 else f"tasks {first}-{last - 1}"
                guard.start()
            try:
                result = run(first, last, guard)
            except UnrollTruncated as cut:
                truncated += last - first
                prepared = _truncate_tasks(prepared, first, last, cut.steps, mode)
                result = run(first, last, None)
            except TaskSkipped:
                skipped += last - first
                continue
            unit_grads = grads_of(result.surrogate.sum(), meta)
            grads = unit_grads if grads is None else {k: grads[k] + g for k, g in unit_grads.items()}
            task_losses[first:last] = result.outer_loss.detach().to(task_losses)
            task_used[first:last] = True
            stats_rows.append(result.stats)
        used = total - skipped
        if grads is None:
            grads = {k: torch.zeros_like(p) for k, p in meta.named_parameters() if p.requires_grad}
        else:
            grads = {k: g / used for k, g in grads.items()}
        stats: dict[str, float | int | str] = {
            "seconds": time.perf_counter() - start, "tasks": total, "batching": mode, "chunk_size": size,
            "tasks_truncated": truncated, "tasks_skipped": skipped}
        for k in (stats_rows[0] if stats_rows else {}):
            values = torch.cat([row[k].detach().double().reshape(-1) for row in stats_rows])
            stats[k] = values.mean().item()
            stats[f"{k}_max"] = values.max().item()
        # A task that diverged keeps its NaN in the mean: only skipped tasks are left out.
        outer_loss = task_losses[task_used].mean() if used else torch.tensor(float("nan"))
        return MetaGrad(grads, outer_loss, stats, task_losses, task_used)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


_REGISTRY: dict[str, type[AbstractEstimator]] = {}
E = TypeVar("E", bound=type[AbstractEstimator])


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make an estimator available as `get_estimator(name)`."""

    def add(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"estimator name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available_estimators() -> list[str]:
    """The registered estimator names, sorted."""
    return sorted(_REGISTRY)


def get_estimator(name: str, **kwargs: object) -> AbstractEstimator:
    """Build a registered estimator: `get_estimator("truncated", k=5)`.

    Raises:
      UnknownEstimator: the name is not registered (the message lists those that are).
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnknownEstimator(f"unknown estimator {name!r}; available: {', '.join(available_estimators())}") from None
    return cls(**kwargs)
