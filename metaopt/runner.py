"""The runner: an estimator over a batch of tasks, under a budget.

An estimator only differentiates one task (`task_objective`, which also runs
under vmap, and on a chunk's task axis for estimators that stack: `metaopt.stacked`);
the runner owns everything around it: stacked, vmap or a loop, chunks of a
batched call, the budget guard (inner steps *and* backward passes), retries of
truncated chunks, skipped tasks and the counts, and the mean of the chunks'
meta-gradients. `AbstractEstimator.__call__` and `metaopt.planning`'s probes both
go through `run_meta_gradient`, so what the planner measures is what training runs.

Chunks are independent: each chunk's graph is released before the next starts
(measured on the sinusoid MLP at T=200, 25 tasks in vmapped chunks of 6: keeping the
previous chunk's objective alive while the next ran took the meta-step's peak RSS from
30 MB to 49 MB), so a meta-step's peak is its largest chunk's plus the accumulated
gradients.

This module imports no estimator: it takes anything with `check`, `vmap_blocker`, `stacked_blocker`,
`stacked_slower` and `task_objective` (the `Differentiator` protocol).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Literal, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_map, tree_map_only

from metaopt.batching import Batching, compress_support, expand_support, resolve_batching, task_count, vmap_tasks
from metaopt.budget import Budget
from metaopt.guard import StepGuard, TaskSkipped, UnrollTruncated
from metaopt.loop import InnerLoop
from metaopt.memory import peak_bytes, reset_peak
from metaopt.stacked import StackedLoop
from metaopt.types import MetaParams, Task

__all__ = ["MetaGrad", "TaskObjective", "Differentiator", "run_meta_gradient", "resolve_for", "grads_of", "chunks_of"]


class MetaGrad(NamedTuple):
    """What a meta-gradient call returns.

    Attributes:
      grads: one tensor per meta-parameter, keyed like `meta.named_parameters()`
        (zeros for meta-parameters the outer loss does not depend on); the mean
        over the batch of tasks.
      outer_loss: mean outer loss over the tasks (detached, a scalar).
      stats: "seconds" (wall-clock of the call), "tasks", "batching", and
        estimator-specific figures.
      task_losses: each task's outer loss, [B] (NaN for skipped tasks).
      task_used: bool [B], False for tasks skipped under the budget.
      carry: what an online estimator carries to each task's next window (`Task.carry`'s state, with
        the task axis first; detached), or None (estimators that carry nothing, or a chunk was skipped:
        then the tasks' unrolls cannot continue and restart).
    """

    grads: dict[str, Tensor]
    outer_loss: Tensor
    stats: dict[str, float | int | str]
    task_losses: Tensor | None = None
    task_used: Tensor | None = None
    carry: Any = None


class TaskObjective(NamedTuple):
    """One task's contribution.

    Attributes:
      surrogate: a scalar whose gradient w.r.t. the meta-parameters is the
        estimator's meta-gradient for this task.
      outer_loss: the task's outer loss (for reporting; may equal `surrogate`).
      stats: scalar tensors to report (e.g. a solver residual); averaged over tasks,
        and their maximum reported as "<name>_max".
      carry: an online estimator's state for the task's next window (a pytree of tensors), or None.
    """

    surrogate: Tensor
    outer_loss: Tensor
    stats: dict[str, Tensor] = {}
    carry: Any = None


class Differentiator(Protocol):
    """What the runner needs of an estimator."""

    def check(self, loop: InnerLoop, meta: MetaParams) -> None: ...

    def vmap_blocker(self, loop: InnerLoop) -> str | None: ...

    def stacked_blocker(self, loop: InnerLoop, meta: MetaParams) -> str | None: ...

    def stacked_slower(self, loop: InnerLoop, meta: MetaParams) -> str | None: ...

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective: ...


def resolve_for(estimator: Differentiator, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                batching: Batching) -> tuple[Literal["stacked", "vmap", "loop"], Task | list[Task]]:
    """`resolve_batching` with what blocks or slows this estimator's vmapped and stacked forms (the runner, the
    planner and its measurements resolve alike)."""
    return resolve_batching(tasks, batching, estimator.vmap_blocker(loop), estimator.stacked_blocker(loop, meta),
                            estimator.stacked_slower(loop, meta))


def grads_of(loss: Tensor, meta: MetaParams) -> dict[str, Tensor]:
    """d loss / d meta for every meta-parameter that requires grad (zeros where unused)."""
    named = [(k, p) for k, p in meta.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("meta has no parameters that require grad: nothing to meta-learn")
    if not loss.requires_grad:  # no path from any meta-parameter (e.g. truncated before the only one used)
        return {k: torch.zeros_like(p) for k, p in named}
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(named, grads)}


def chunks_of(total: int, size: int) -> list[tuple[int, int]]:
    """[(first, last)) ranges of at most `size` tasks covering 0..total-1, in order."""
    return [(i, min(i + size, total)) for i in range(0, total, size)]


class _Chunk(NamedTuple):
    """A chunk's result with no graph left in it: `grads` is the mean over its tasks; `mean_loss` the mean of
    `outer_loss` and `used` its all-True task mask where the chunk made them already (a compiled chunk: two ops
    fewer after the call, where each costs several times its usual few us), else None."""

    grads: dict[str, Tensor]
    outer_loss: Tensor
    stats: dict[str, Tensor]
    carry: Any = None
    mean_loss: Tensor | None = None
    used: Tensor | None = None


class _Run:
    """One meta-gradient call: the prepared tasks and how to differentiate a chunk of them."""

    def __init__(self, estimator: Differentiator, loop: InnerLoop, meta: MetaParams, prepared: Task | list[Task],
                 guard: StepGuard | None, stacked: bool = False):
        self.estimator, self.loop, self.meta, self.guard, self.stacked = estimator, loop, meta, guard, stacked
        self._prepare(prepared)

    def _prepare(self, prepared: Task | list[Task]) -> None:
        """Keep the tasks, and for a stacked batch its distinct support batches once (not per chunk)."""
        self.prepared = prepared
        self.compressed = compress_support(prepared) if isinstance(prepared, Task) else None

    def objective(self, first: int, last: int, guard: StepGuard | None) -> TaskObjective:
        def one(task: Task) -> TaskObjective:
            result = self.estimator.task_objective(self.loop, self.meta, task, guard)
            return result if result.carry is not None else result._replace(carry=())  # vmap returns no None
        if self.compressed is not None:
            compressed, pattern = self.compressed
            part = tree_map_only(Tensor, lambda v: v[first:last], compressed)
            if self.stacked:
                result = self.estimator.task_objective(StackedLoop(self.loop, last - first), self.meta,
                                                       expand_support(part, pattern), guard)
                return result if result.carry is not None else result._replace(carry=())
            return vmap_tasks(one, part, pattern)
        assert isinstance(self.prepared, list)
        return tree_map_only(Tensor, lambda v: v.unsqueeze(0), one(self.prepared[first]))

    def chunk(self, first: int, last: int, guard: StepGuard | None) -> _Chunk:
        """The chunk's gradients, losses and stats; its graph is freed on return (nothing escapes)."""
        compiled = getattr(self.estimator, "chunk_gradient", None)  # metaopt.compiled.Compiled
        if compiled is not None and self.compressed is not None:
            compressed, pattern = self.compressed
            whole = first == 0 and last == compressed.query.x.shape[0]  # slicing costs more than this path's step
            part = compressed if whole else tree_map_only(Tensor, lambda v: v[first:last], compressed)
            traced = getattr(self.estimator, "first_calls", 0)
            done = compiled(self.loop, self.meta, part, pattern, self.stacked)
            if guard is not None and getattr(self.estimator, "first_calls", 0) != traced:
                # A call that traced a new shape spent the compiler's memory and time (reported apart: meta_train's
                # compile_peak_bytes, compile_seconds); the budget guards the calls after it, from here.
                guard.start()
            if done is not None:  # None: the wrapper fell back to eager
                if guard is not None:
                    guard.after_backward(self.steps(first))
                grads, outer_loss, stats, mean_loss, used = done
                return _Chunk(grads, outer_loss, stats, mean_loss=mean_loss, used=used)
        result = self.objective(first, last, guard)
        grads = grads_of(result.surrogate.mean(), self.meta)
        if guard is not None:
            guard.after_backward(self.steps(first))
        carry = None if result.carry == () else tree_map_only(Tensor, Tensor.detach, result.carry)
        return _Chunk(grads, result.outer_loss.detach(), {k: v.detach() for k, v in result.stats.items()}, carry)

    def steps(self, first: int) -> int:
        return (self.prepared if isinstance(self.prepared, Task) else self.prepared[first]).inner_steps

    def truncate(self, first: int, last: int, steps: int) -> None:
        """Cut tasks first..last-1 to their first `steps` inner steps (a stacked batch is cut whole)."""
        if isinstance(self.prepared, Task):
            self._prepare(self.prepared._replace(support=self.prepared.support[:steps]))
        else:
            self._prepare([t._replace(support=t.support[:steps]) if first <= i < last else t
                           for i, t in enumerate(self.prepared)])

    def guarded_chunk(self, first: int, last: int) -> tuple[_Chunk | None, int]:
        """(the chunk, or None if skipped; 1 if it was truncated) under the budget's on_exceed."""
        if self.guard is not None:
            self.guard.what = f"task {first}" if last - first == 1 else f"tasks {first}-{last - 1}"
            self.guard.restart_clock()
        try:
            return self.chunk(first, last, self.guard), 0
        except UnrollTruncated as cut:
            self.truncate(first, last, cut.steps)
        except TaskSkipped:
            return None, 0
        # The steps that fitted are recomputed; their time was already spent, so only memory is guarded.
        retry = None if self.guard is None else self.guard.memory_only()
        try:
            return self.chunk(first, last, retry), 1
        except (UnrollTruncated, TaskSkipped):  # the cut unroll still does not fit
            return None, 0


def run_meta_gradient(estimator: Differentiator, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                      budget: Budget | None = None, *, batching: Batching = "auto", chunk_size: int | None = None,
                      clock: Callable[[], float] | None = None,
                      memory_probe: Callable[[], int] | None = None) -> MetaGrad:
    """The meta-gradient of the mean outer loss over a batch of tasks.

    Args:
      estimator: how to differentiate one task.
      loop: the inner loop.
      meta: the meta-parameters.
      tasks: a stacked batch of tasks (leading task axis) or a list of tasks.
      budget: the budget of the whole call (memory: the peak of all chunks, forward and backward;
        time: per task or vmapped chunk), enforced at inner-step boundaries and after each chunk's
        backward pass by a `StepGuard` (None: unlimited, no guard). Up-front prediction is
        `metaopt.planning.plan`'s job.
      batching: "stacked" and "vmap" run tasks in one vectorized graph (fast; memory grows with the
        tasks in it): "stacked" on the task axis with metaopt's stacked layers (`metaopt.stacked`: the
        fastest eager), "vmap" with `torch.func.vmap` of the per-task function; "loop" one task graph at a
        time; "auto" the first of these that the tasks, the estimator and the model allow.
      chunk_size: stacked or under vmap, at most this many tasks per vectorized graph (None: all).
      clock, memory_probe: for the guard (defaults: time.monotonic, and the peak since the call
        started from `metaopt.memory.peak_bytes` on the tasks' device); injectable for tests.

    Returns:
      The mean over the tasks that were not skipped. `stats` has "seconds", "tasks",
      "batching", "chunk_size", "tasks_truncated", "tasks_skipped" and the estimator's own
      figures; `task_losses` has each task's outer loss (NaN for a skipped task).
    """
    estimator.check(loop, meta)
    start = time.perf_counter()
    mode, prepared = resolve_for(estimator, loop, meta, tasks, batching)
    total = task_count(prepared) if isinstance(prepared, Task) else len(prepared)
    size = 1 if mode == "loop" else total if chunk_size is None else max(1, min(chunk_size, total))
    device = (prepared if isinstance(prepared, Task) else prepared[0]).query.x.device
    guard = None
    if budget is not None and not budget.unlimited:
        probe = memory_probe if memory_probe is not None else (lambda: peak_bytes(device))
        guard = StepGuard(budget, clock or time.monotonic, probe,
                          memory_reset=None if memory_probe is not None else (lambda: reset_peak(device)))
    run = _Run(estimator, loop, meta, prepared, guard, stacked=mode == "stacked")
    mean_gradient = _MeanGradient()
    losses: list[tuple[int, int, Tensor]] = []
    stats_rows: list[dict[str, Tensor]] = []
    carries: list[Any] = []
    truncated = skipped = 0
    whole: _Chunk | None = None  # the one chunk of all the tasks
    for first, last in chunks_of(total, size):
        done, was_cut = run.guarded_chunk(first, last)
        if done is None:
            skipped += last - first
            continue
        whole = done if last - first == total else None
        truncated += was_cut * (last - first)
        mean_gradient.add(last - first, done.grads)
        losses.append((first, last, done.outer_loss))
        stats_rows.append(done.stats)
        carries.append(done.carry)
    used = total - skipped
    grads = mean_gradient.result(meta)
    task_losses, task_used = _task_losses(losses, total, whole)
    stats: dict[str, float | int | str] = {
        "seconds": time.perf_counter() - start, "tasks": total, "batching": mode, "chunk_size": size,
        "tasks_truncated": truncated, "tasks_skipped": skipped}
    for k in (stats_rows[0] if stats_rows else {}):
        values = torch.cat([row[k].double().reshape(-1) for row in stats_rows])
        stats[k] = values.mean().item()
        stats[f"{k}_max"] = values.max().item()
    # A task that diverged keeps its NaN in the mean: only skipped tasks are left out.
    whole_mean = whole.mean_loss if whole is not None else None
    outer_loss = _as(whole_mean, task_losses) if whole_mean is not None else task_losses.mean() if used == total \
        else task_losses[task_used].mean() if used else torch.tensor(float("nan"))
    carry = None if skipped or any(c is None for c in carries) else \
        carries[0] if len(carries) == 1 else tree_map(lambda *parts: torch.cat(parts), *carries)
    return MetaGrad(grads, outer_loss, stats, task_losses, task_used, carry)


class _MeanGradient:
    """The mean gradient over the tasks of the chunks that ran, summed as they come (each chunk's grads are its
    own tasks' mean); a call that ran as one chunk returns that chunk's gradients with no extra op."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.tasks = 0
        self.only: dict[str, Tensor] | None = None  # the first chunk's gradients, while it is the only one
        self.total: list[Tensor] | None = None  # sum over chunks of tasks x mean gradient

    def add(self, tasks: int, grads: dict[str, Tensor]) -> None:
        if not self.names:
            self.names, self.only, self.tasks = list(grads), grads, tasks
            return
        if self.only is not None:
            self.total = list(torch._foreach_mul(list(self.only.values()), float(self.tasks)))  # one dispatch
            self.only = None
        assert self.total is not None
        torch._foreach_add_(self.total, [grads[k] for k in self.names], alpha=float(tasks))
        self.tasks += tasks

    def result(self, meta: MetaParams) -> dict[str, Tensor]:
        if self.only is not None:
            return self.only
        if self.total is None:  # every task was skipped
            return {k: torch.zeros_like(p) for k, p in meta.named_parameters() if p.requires_grad}
        return dict(zip(self.names, torch._foreach_div(self.total, float(self.tasks))))


def _as(tensor: Tensor, like: Tensor) -> Tensor:
    """`tensor.to(like)`, without the op where it would change nothing (an op after a compiled call is costly)."""
    return tensor if tensor.dtype == like.dtype and tensor.device == like.device else tensor.to(like)


def _task_losses(losses: list[tuple[int, int, Tensor]], total: int,
                 whole: _Chunk | None = None) -> tuple[Tensor, Tensor]:
    """Each task's outer loss (NaN where skipped; default dtype, on the CPU) and whether it was used, from the
    chunks' (first, last, outer losses), or from `whole`, the one chunk of all the tasks (its own mask where it
    made one on the CPU: a mask on another device is made here rather than copied, a host sync)."""
    dtype = torch.get_default_dtype()
    if whole is not None:
        used = whole.used if whole.used is not None and whole.used.device.type == "cpu" else \
            torch.ones(total, dtype=torch.bool)
        loss = whole.outer_loss
        return (loss if loss.dtype == dtype and loss.device.type == "cpu" else loss.to("cpu", dtype)), used
    task_losses = torch.full((total,), float("nan"), dtype=dtype)
    task_used = torch.zeros(total, dtype=torch.bool)
    for first, last, loss in losses:
        task_losses[first:last] = loss.to(task_losses)
        task_used[first:last] = True
    return task_losses, task_used
