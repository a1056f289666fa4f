"""Meta-testing: post-adaptation performance on fresh seeded tasks, planned as training is: by memory, then by time.

`plan_evaluation` sizes the pieces (stacked where the loop stacks, else vmapped) to the memory budget, then times 1,
2, 4, ... tasks at once up to that size (never above the tasks it plans for, and within `PLANNING_SHARE` of the
evaluation) and runs the fastest (`EvalPlan`); `evaluate` runs the plan and reports its predicted and measured
seconds.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from metaopt import losses
from metaopt.batching import Batching, compress_support, resolve_batching, vmap_tasks
from metaopt.budget import Budget, machine_bounded
from metaopt.deadline import Deadline
from metaopt.loop import InnerLoop, unroll
from metaopt.memory import measure_peak_memory
from metaopt.prediction import seconds_of
from metaopt.stacked import StackedLoop, stacked_blocker, stacked_slower
from metaopt.estimators.base import AbstractEstimator
from metaopt.tasks.augment import pooled_views
from metaopt.tasks.base import TaskDistribution
from metaopt.types import MetaParams, Task

__all__ = ["evaluate", "mean_ci95", "task_to", "EvalPlan", "plan_evaluation", "plan_ahead"]

logger = logging.getLogger("metaopt")

EvalBatching = Literal["stacked", "vmap", "loop"]
PROBE_TASKS = 4  # memory is measured at 1 and min(batch_size, PROBE_TASKS) tasks at once; explicit forms timed there
TIMING_ROUNDS = 2  # timed calls per size, after a warm-up; the fastest is kept
PLANNING_SHARE = 0.5
"""Past `PROBE_TASKS` at once, a size is timed only while the ladder's calls (a warm-up and `TIMING_ROUNDS` per size,
counted at the fastest seconds per task so far) stay within this share of the evaluation it plans: a long unroll's
ladder to 100 at once cost more than the 200-task evaluation itself."""


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval (1.96 s / sqrt(n))."""
    values = values.detach().double().flatten()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else float("nan")
    return values.mean().item(), 1.96 * std / math.sqrt(n)


def task_to(task: Task, device: torch.device | str) -> Task:
    """The task with every tensor moved to `device`."""
    return torch.utils._pytree.tree_map_only(Tensor, lambda v: v.to(device), task)


def _first(batch: Task, count: int) -> Task:
    return torch.utils._pytree.tree_map_only(Tensor, lambda v: v[:count], batch)


def _adapted_scores(loop: InnerLoop, meta: MetaParams, batch: Task, classification: bool,
                    batching: Batching, query_views: int = 1) -> tuple[Tensor, Tensor]:
    """Each task's post-adaptation outer loss and accuracy (zeros for regression), [B] each; a query's
    predictions averaged over its `query_views` views (`TaskDistribution.query_views`). "stacked": the tasks on
    their task axis (`metaopt.stacked.StackedLoop`: the loop must stack, `evaluation_form`)."""
    def per_task(task: Task) -> tuple[Tensor, Tensor]:
        state = unroll(loop, loop.init(meta, task.init), task.support, meta, create_graph=False)
        pred, y = pooled_views(loop.predict(state, task.query.x), task.query.y, query_views)
        score = losses.accuracy(pred, y) if classification else pred.new_zeros(())
        return loop.outer_loss_fn(pred, y), score

    with torch.no_grad():  # torch.func.grad still computes the inner gradients
        if batching == "stacked":
            return _stacked_scores(loop, meta, batch, classification, query_views)
        _, prepared = resolve_batching(batch, batching)
        if isinstance(prepared, Task):  # vmap
            compressed, pattern = compress_support(prepared)
            return vmap_tasks(per_task, compressed, pattern)
        loss, score = (torch.stack(v) for v in zip(*(per_task(t) for t in prepared)))
        return loss, score


def _stacked_scores(loop: InnerLoop, meta: MetaParams, batch: Task, classification: bool,
                    query_views: int) -> tuple[Tensor, Tensor]:
    """`_adapted_scores` of a stacked batch on its task axis: ordinary batched tensor code, no vmap."""
    on_axis = StackedLoop(loop, batch.query.x.shape[0])
    state = unroll(on_axis, on_axis.init(meta, batch.init), batch.support, meta, create_graph=False)
    pred, y = pooled_views(on_axis.predict(state, batch.query.x), batch.query.y, query_views)
    score = (pred.argmax(-1) == y).to(pred.dtype).flatten(1).mean(1) if classification else pred.new_zeros(len(pred))
    return losses.per_task(loop.outer_loss_fn, pred, y), score


def evaluation_form(loop: InnerLoop, meta: MetaParams) -> tuple[EvalBatching, str]:
    """How tasks run together in evaluation: "stacked" where the loop stacks and stacking is not expected slower
    (`metaopt.stacked`; as training's planner decides), else "vmap", and why."""
    why = stacked_blocker(loop, second_order=False) or stacked_slower(loop, meta)
    return ("vmap", f"vmapped ({why})") if why else ("stacked", "stacked")


@dataclass(frozen=True)
class EvalPlan:
    """How meta-test tasks run.

    Attributes:
      batching: "stacked" or "vmap" (pieces of `piece` tasks on their task axis, or in one vmapped graph) or
        "loop" (one task at a time).
      piece: tasks at once, 1 with "loop": the fastest size timed (`batching="auto"`), or the most predicted to fit
        the memory budget (an explicit "stacked" or "vmap").
      reason: why, with the figures.
      task_seconds: measured seconds per task on the planning tasks, at `piece` at once (`batching="auto"`), or at
        `min(piece, PROBE_TASKS)` (an explicit form: approximate, a larger vmapped piece may cost more or less per
        task); None: not timed.
      sample_seconds: seconds to draw one task (measured on the planning draw; 0 if not timed).
    """

    batching: EvalBatching
    piece: int
    reason: str
    task_seconds: float | None = None
    sample_seconds: float = 0.0

    def predicted_seconds(self, n_tasks: int) -> float | None:
        """Predicted wall-clock seconds to draw and score `n_tasks` tasks (approximate; None: not timed)."""
        return None if self.task_seconds is None else n_tasks * (self.task_seconds + self.sample_seconds)


class _PlanningTasks:
    """The first k tasks of a fixed stream (never the meta-test tasks': its own seed), drawn as the plan needs
    them; `sample_seconds` is the measured seconds per drawn task."""

    def __init__(self, tasks: TaskDistribution, inner_steps: int, device: torch.device | str, draw_at_least: int):
        self.tasks, self.inner_steps, self.device, self.draw_at_least = tasks, inner_steps, device, draw_at_least
        self.generator = torch.Generator().manual_seed(4242)
        self.drawn: Task | None = None
        self.count, self.seconds = 0, 0.0

    def first(self, k: int) -> Task:
        if k > self.count:  # draws at least doubles what is drawn
            count = max(k - self.count, self.count, self.draw_at_least)
            start = time.perf_counter()
            more = task_to(self.tasks.sample(count, self.inner_steps, self.generator), self.device)
            self.seconds += time.perf_counter() - start
            self.drawn = more if self.drawn is None else \
                torch.utils._pytree.tree_map(lambda a, b: torch.cat([a, b]) if isinstance(a, Tensor) else a,
                                             self.drawn, more)
            self.count += count
        assert self.drawn is not None
        return _first(self.drawn, k)

    @property
    def sample_seconds(self) -> float:
        return self.seconds / max(self.count, 1)


def _batched_piece(scores: Callable[[int], Any], budget: Budget, batch_size: int, probe_size: int,
                   device: torch.device | str) -> tuple[int, str]:
    """The most tasks at once (stacked or vmapped; at most `batch_size`) predicted to fit under `(1 - headroom) x
    budget.memory`: measured on 1 and `probe_size` tasks (each after a warm-up), linear in the tasks at once.
    Without a memory budget, under the memory available on `device` now (`machine_bounded`)."""
    budget, available = machine_bounded(budget, device)
    if batch_size <= 1:
        return 1, "1 at once (eval batch_size 1)"
    if budget.memory is None:
        return batch_size, f"{batch_size} at once (no memory bound is known)"

    def peak(count: int) -> int:
        scores(count)  # warm-up
        with measure_peak_memory(device) as memory:
            scores(count)
        return memory.peak_bytes

    one, many = peak(1), peak(probe_size)
    per_task = max(many - one, 0) / max(probe_size - 1, 1)
    limit = (1 - budget.headroom) * budget.memory
    piece = batch_size if per_task == 0 else int(max(1, min(batch_size, (limit - one) // per_task + 1)))
    bound = "the memory available" if available is not None else "the memory budget"
    return piece, f"{piece} of {batch_size} at once fit {limit / 1e6:.3g} MB ({bound} less headroom)"


def plan_evaluation(loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution, budget: Budget, *,
                    inner_steps: int, batch_size: int, batching: Batching = "auto",
                    device: torch.device | str = "cpu", n_tasks: int | None = None,
                    timer: Callable[[EvalBatching, int], float] | None = None) -> EvalPlan:
    """How to run meta-test tasks drawn `batch_size` at a time: by memory, then by time, as training is planned.

    Tasks run together stacked where the loop stacks, else vmapped (`evaluation_form`), or one at a time. On tasks
    from a fixed stream (never the meta-test tasks'), the most at once is sized to the memory budget
    (`_batched_piece`, measured on 1 and `min(batch_size, PROBE_TASKS)` tasks). Under `batching="auto"` the
    seconds per task are then timed at 1 (one task at a time), 2, 4, ... tasks at once up to that size, until a
    size is no faster than the one before, and the fastest size runs: a vmapped conv4 is a grouped convolution
    whose cost per task grows with the tasks at once on the CPU, while the sinusoid MLP's falls to the largest
    piece. Each size is timed where it will run (a warm-up call, then the fastest of `TIMING_ROUNDS`), so the
    prediction is of the chosen form itself. An explicit "stacked" (vmap where the loop does not stack), "vmap"
    or "loop" is kept, and timed on `min(piece, PROBE_TASKS)` tasks for the prediction alone. `n_tasks`: the tasks
    the plan is for, where known: no size above it is sized or timed (an evaluation never runs more at once), and
    past `PROBE_TASKS` the ladder stops where timing the next size would cost more than `PLANNING_SHARE` of the
    evaluation. `timer(form, n_tasks)`: a stand-in for one timed call (tests)."""
    if batching not in ("auto", "stacked", "vmap", "loop"):
        raise ValueError(f"evaluation batching must be 'auto', 'stacked', 'vmap' or 'loop', got {batching!r}")
    largest = batch_size if n_tasks is None else max(1, min(batch_size, n_tasks))  # the most an evaluation runs
    drawn = _PlanningTasks(tasks, inner_steps, device, min(largest, PROBE_TASKS))
    classification = tasks.kind == "classification"
    form: EvalBatching
    form, how = ("vmap", "vmapped") if batching == "vmap" else evaluation_form(loop, meta)

    ran: set[tuple[int, EvalBatching]] = set()  # (tasks at once, form) run once already: warm

    def scores(count: int, run: EvalBatching = form) -> None:
        _adapted_scores(loop, meta, drawn.first(count), classification, run, tasks.query_views)
        ran.add((count, run))

    def per_task(count: int) -> float:
        run: EvalBatching = "loop" if count == 1 else form
        return _seconds_per_task(scores, count, run, timer, device, warm=(count, run) in ran)

    piece, why = (1, "one at a time (batching=loop)") if batching == "loop" else \
        _batched_piece(scores, budget, largest, max(1, min(largest, PROBE_TASKS)), device)
    if batching != "auto":
        size = 1 if batching == "loop" else min(piece, PROBE_TASKS)
        seconds = per_task(size)
        return EvalPlan("loop" if batching == "loop" else form, piece, f"{why}, {how}; {seconds * 1e3:.3g} ms per "
                        f"task timed at {size} at once", seconds, drawn.sample_seconds)
    timed: dict[int, float] = {}
    best, spent, stopped = 1, 0.0, ""  # spent: the ladder's task-runs, in seconds at the fastest so far
    for size in AbstractEstimator.doubling(2, piece):
        if n_tasks is not None and size > PROBE_TASKS and \
                spent + (TIMING_ROUNDS + 1) * size * timed[best] > PLANNING_SHARE * n_tasks * timed[best]:
            stopped = f"; {size} at once not timed (its timing would cost over {PLANNING_SHARE:g} of the evaluation)"
            break
        warm = (size, "loop" if size == 1 else form) in ran
        timed[size] = per_task(size)
        spent += (TIMING_ROUNDS + (0 if warm else 1)) * size * timed[size]
        if size > 1 and timed[size] >= timed[best]:
            break
        best = size
    ladder = ", ".join(f"{size}: {seconds * 1e3:.3g} ms" for size, seconds in timed.items())
    runs = "one at a time" if best == 1 else f"{best} at once, {how}"
    return EvalPlan("loop" if best == 1 else form, best, f"{why}, {how}; per task at 1, 2, 4, ... at once "
                    f"({ladder}{stopped}): {runs}", timed[best], drawn.sample_seconds)


def _seconds_per_task(scores: Callable[..., None], count: int, form: EvalBatching,
                      timer: Callable[[EvalBatching, int], float] | None, device: torch.device | str,
                      warm: bool = False) -> float:
    """Seconds per task of `count` planning tasks at once in `form`: a warm-up unless that call ran already (the
    memory's probes), then the fastest of `TIMING_ROUNDS` calls."""
    if timer is not None:
        return timer(form, count) / count
    if not warm:
        scores(count, form)
    return min(seconds_of(lambda: scores(count, form), device) for _ in range(TIMING_ROUNDS)) / count


def plan_ahead(what: str, loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution, budget: Budget, n_tasks: int,
               *, deadline: Deadline | None = None, **settings: Any) -> EvalPlan:
    """An evaluation of `n_tasks` tasks that runs after training, planned before it (`plan_evaluation` with
    `settings`): its plan and predicted seconds said in the log as `what` (e.g. "the final evaluation") and
    reserved in the session's `deadline` (`metaopt.deadline`), if any."""
    plan = plan_evaluation(loop, meta, tasks, budget, n_tasks=n_tasks, **settings)
    predicted = plan.predicted_seconds(n_tasks)
    logger.info("%s: %s; %d tasks predicted %s", what, plan.reason, n_tasks,
                "untimed" if predicted is None else f"{predicted:.3g} s")
    if deadline is not None:
        deadline.reserve(f"{what} ({n_tasks} tasks)", predicted)
    return plan


def evaluate(loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution, *, n_tasks: int = 600,
             inner_steps: int = 1, batch_size: int = 100, seed: int = 1234,
             batching: Batching = "auto", device: torch.device | str = "cpu",
             return_per_task: bool = False, budget: Budget | None = None,
             plan: EvalPlan | None = None) -> dict[str, Any]:
    """Post-adaptation performance on `n_tasks` fresh tasks from a seeded generator.

    Each task adapts from `loop.init(meta, task.init)` for `inner_steps` steps on its support
    set; the adapted model is scored on its query set (a query's predictions averaged over its views where
    `tasks.query_views` > 1). No meta-gradient is built. Tasks are
    drawn `batch_size` at a time whatever the plan (the same seed and `batch_size` give the
    same tasks) and run as `plan` says (default: `plan_evaluation`, i.e. stacked or vmapped pieces that fit
    `budget.memory`, of the size measured fastest, or one at a time; a caller that evaluates often passes the
    plan it made once).

    Returns:
      "meta_test_loss" and "meta_test_loss_ci95" (mean and 95% CI half-width over
      tasks), plus "test_accuracy" and "test_accuracy_ci95" for classification, and
      "eval_peak_bytes" (the measured peak of the whole evaluation above its start), "eval_batch_size" (tasks at
      once), "eval_batching", "eval_plan" (why), "eval_seconds" (measured: drawing and scoring),
      "predicted_eval_seconds" (the plan's, approximate) and "eval_plan_seconds" (planning). With
      `return_per_task`, also "task_losses" (and "task_accuracies"): tensors [n_tasks] in task order, for paired
      comparisons of two methods on the same tasks.

    Raises:
      ValueError: `n_tasks` or `batch_size` below 1 (nothing to score), before any work.
    """
    if n_tasks < 1 or batch_size < 1:
        raise ValueError(f"evaluate: need n_tasks >= 1 and batch_size >= 1, got n_tasks={n_tasks}, "
                         f"batch_size={batch_size}")
    budget = budget if budget is not None else Budget()
    tasks = tasks.to(device)  # where it can, the distribution samples on the device (the same tasks)
    start = time.perf_counter()
    if plan is None:
        plan = plan_evaluation(loop, meta, tasks, budget, inner_steps=inner_steps, batch_size=batch_size,
                               batching=batching, device=device, n_tasks=n_tasks)
    planned = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    classification = tasks.kind == "classification"
    piece = batch_size if plan.batching == "loop" else plan.piece  # "loop" runs a piece's tasks in turn
    task_losses, scores = [], []
    with measure_peak_memory(device) as memory:
        for first_task in range(0, n_tasks, batch_size):  # draws as at `batch_size`; run in pieces of `piece`
            batch = task_to(tasks.sample(min(batch_size, n_tasks - first_task), inner_steps, generator), device)
            for first in range(0, batch.query.x.shape[0], piece):
                part = torch.utils._pytree.tree_map_only(Tensor, lambda v: v[first:first + piece], batch)
                loss, score = _adapted_scores(loop, meta, part, classification, plan.batching, tasks.query_views)
                task_losses.append(loss)
                scores.append(score)
    all_losses, all_scores = torch.cat(task_losses), torch.cat(scores)
    metrics: dict[str, Any] = dict(zip(("meta_test_loss", "meta_test_loss_ci95"), mean_ci95(all_losses)))
    if classification:
        metrics.update(zip(("test_accuracy", "test_accuracy_ci95"), mean_ci95(all_scores)))
    metrics.update(eval_peak_bytes=memory.peak_bytes, eval_batch_size=plan.piece, eval_batching=plan.batching,
                   eval_plan=plan.reason, eval_seconds=time.perf_counter() - planned,
                   predicted_eval_seconds=plan.predicted_seconds(n_tasks), eval_plan_seconds=planned - start)
    if return_per_task:
        metrics["task_losses"] = all_losses.cpu()
        if classification:
            metrics["task_accuracies"] = all_scores.cpu()
    return metrics
