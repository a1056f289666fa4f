"""Meta-testing: post-adaptation performance on fresh seeded tasks, in batches that fit a memory budget."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from metaopt import losses
from metaopt.batching import Batching, compress_support, resolve_batching, vmap_tasks
from metaopt.budget import Budget, machine_bounded
from metaopt.loop import InnerLoop, unroll
from metaopt.memory import measure_peak_memory
from metaopt.tasks.augment import pooled_views
from metaopt.tasks.base import TaskDistribution
from metaopt.types import MetaParams, Task

__all__ = ["evaluate", "mean_ci95", "task_to", "eval_batch_size_for"]


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval (1.96 s / sqrt(n))."""
    values = values.detach().double().flatten()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else float("nan")
    return values.mean().item(), 1.96 * std / math.sqrt(n)


def task_to(task: Task, device: torch.device | str) -> Task:
    """The task with every tensor moved to `device`."""
    return torch.utils._pytree.tree_map_only(Tensor, lambda v: v.to(device), task)


def _adapted_scores(loop: InnerLoop, meta: MetaParams, batch: Task, classification: bool,
                    batching: Batching, query_views: int = 1) -> tuple[Tensor, Tensor]:
    """Each task's post-adaptation outer loss and accuracy (zeros for regression), [B] each; a query's
    predictions averaged over its `query_views` views (`TaskDistribution.query_views`)."""
    def per_task(task: Task) -> tuple[Tensor, Tensor]:
        state = unroll(loop, loop.init(meta, task.init), task.support, meta, create_graph=False)
        pred, y = pooled_views(loop.predict(state, task.query.x), task.query.y, query_views)
        score = losses.accuracy(pred, y) if classification else pred.new_zeros(())
        return loop.outer_loss_fn(pred, y), score

    with torch.no_grad():  # torch.func.grad still computes the inner gradients
        # Evaluation vmaps a batch (stacked batching serves meta-gradients: `metaopt.stacked`).
        _, prepared = resolve_batching(batch, "vmap" if batching == "stacked" else batching)
        if isinstance(prepared, Task):  # vmap
            compressed, pattern = compress_support(prepared)
            return vmap_tasks(per_task, compressed, pattern)
        loss, score = (torch.stack(v) for v in zip(*(per_task(t) for t in prepared)))
        return loss, score


def eval_batch_size_for(loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution, budget: Budget, *,
                        inner_steps: int, batch_size: int, batching: Batching = "auto",
                        device: torch.device | str = "cpu") -> int:
    """The largest number of meta-test tasks per vmapped graph (at most `batch_size`) predicted to fit under
    `(1 - headroom) x budget.memory`: evaluation is measured on 1 and on min(batch_size, 4) tasks (after a
    warm-up) and is linear in the tasks at once. Without a memory budget, under the memory available on `device`
    now (`metaopt.budget.machine_bounded`; `batch_size` itself where that is unknown)."""
    budget = machine_bounded(budget, device)[0]
    if budget.memory is None or batch_size <= 1:
        return batch_size
    generator = torch.Generator().manual_seed(4242)  # never the meta-test tasks' own generator
    probe = task_to(tasks.sample(min(batch_size, 4), inner_steps, generator), device)
    classification = tasks.kind == "classification"
    n = probe.query.x.shape[0]

    def peak(count: int) -> int:
        part = torch.utils._pytree.tree_map_only(Tensor, lambda v: v[:count], probe)
        _adapted_scores(loop, meta, part, classification, batching, tasks.query_views)  # warm-up
        with measure_peak_memory(device) as memory:
            _adapted_scores(loop, meta, part, classification, batching, tasks.query_views)
        return memory.peak_bytes

    one, many = peak(1), peak(n)
    per_task = max(many - one, 0) / max(n - 1, 1)
    limit = (1 - budget.headroom) * budget.memory
    if per_task == 0:
        return batch_size
    return int(max(1, min(batch_size, (limit - one) // per_task + 1)))


def evaluate(loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution, *, n_tasks: int = 600,
             inner_steps: int = 1, batch_size: int = 100, seed: int = 1234,
             batching: Batching = "auto", device: torch.device | str = "cpu",
             return_per_task: bool = False, budget: Budget | None = None) -> dict[str, Any]:
    """Post-adaptation performance on `n_tasks` fresh tasks from a seeded generator.

    Each task adapts from `loop.init(meta, task.init)` for `inner_steps` steps on its support
    set; the adapted model is scored on its query set (a query's predictions averaged over its views where
    `tasks.query_views` > 1). No meta-gradient is built. Tasks are
    drawn `batch_size` at a time whatever the budget (the same seed and `batch_size` give the
    same tasks) and run in vmapped pieces that fit `budget.memory` (`eval_batch_size_for`).

    Returns:
      "meta_test_loss" and "meta_test_loss_ci95" (mean and 95% CI half-width over
      tasks), plus "test_accuracy" and "test_accuracy_ci95" for classification, and
      "eval_peak_bytes" (the measured peak of the whole evaluation above its start) and
      "eval_batch_size". With `return_per_task`, also "task_losses" (and "task_accuracies"):
      tensors [n_tasks] in task order, for paired comparisons of two methods on the same tasks.

    Raises:
      ValueError: `n_tasks` or `batch_size` below 1 (nothing to score), before any work.
    """
    if n_tasks < 1 or batch_size < 1:
        raise ValueError(f"evaluate: need n_tasks >= 1 and batch_size >= 1, got n_tasks={n_tasks}, "
                         f"batch_size={batch_size}")
    budget = budget if budget is not None else Budget()
    tasks = tasks.to(device)  # where it can, the distribution samples on the device (the same tasks)
    fitted = eval_batch_size_for(loop, meta, tasks, budget, inner_steps=inner_steps, batch_size=batch_size,
                                 batching=batching, device=device)
    generator = torch.Generator().manual_seed(seed)
    classification = tasks.kind == "classification"
    task_losses, scores = [], []
    with measure_peak_memory(device) as memory:
        for start in range(0, n_tasks, batch_size):  # draws as at `batch_size`; run in pieces of `fitted`
            batch = task_to(tasks.sample(min(batch_size, n_tasks - start), inner_steps, generator), device)
            for first in range(0, batch.query.x.shape[0], fitted):
                part = torch.utils._pytree.tree_map_only(Tensor, lambda v: v[first:first + fitted], batch)
                loss, score = _adapted_scores(loop, meta, part, classification, batching, tasks.query_views)
                task_losses.append(loss)
                scores.append(score)
    all_losses, all_scores = torch.cat(task_losses), torch.cat(scores)
    metrics: dict[str, Any] = dict(zip(("meta_test_loss", "meta_test_loss_ci95"), mean_ci95(all_losses)))
    if classification:
        metrics.update(zip(("test_accuracy", "test_accuracy_ci95"), mean_ci95(all_scores)))
    metrics.update(eval_peak_bytes=memory.peak_bytes, eval_batch_size=fitted)
    if return_per_task:
        metrics["task_losses"] = all_losses.cpu()
        if classification:
            metrics["task_accuracies"] = all_scores.cpu()
    return metrics
