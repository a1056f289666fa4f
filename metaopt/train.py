"""Meta-training: outer optimizer, evaluation, checkpoint/resume, metrics.

The library returns a metrics dict and calls an optional `log` callback; it never
talks to a logger or a config system itself.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metaopt import losses
from metaopt.batching import Batching, compress_support, resolve_batching, unstack_tasks, vmap_tasks
from metaopt.budget import Budget
from metaopt.checkpoint import load_checkpoint, save_atomic
from metaopt.diagnose import locate_nonfinite
from metaopt.estimators import Auto
from metaopt.estimators.base import AbstractEstimator, MetaGrad
from metaopt.guard import format_bytes
from metaopt.loop import InnerLoop, unroll
from metaopt.memory import default_method, measure_peak_memory
from metaopt.planning import Meter, Plan, describe, plan
from metaopt.tasks.base import TaskDistribution
from metaopt.types import MetaParams, Task

__all__ = ["meta_train", "evaluate", "mean_ci95", "apply_meta_grad", "task_to"]

LogFn = Callable[[dict[str, float], int], None]
logger = logging.getLogger("metaopt")


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval (1.96 s / sqrt(n))."""
    values = values.detach().double().flatten()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else float("nan")
    return values.mean().item(), 1.96 * std / math.sqrt(n)


def task_to(task: Task, device: torch.device | str) -> Task:
    """The task with every tensor moved to `device`."""
    return torch.utils._pytree.tree_map_only(Tensor, lambda v: v.to(device), task)


def apply_meta_grad(meta: MetaParams, meta_grad: MetaGrad) -> None:
    """Write a MetaGrad into `.grad` of the meta-parameters (the only place that does)."""
    for name, p in meta.named_parameters():
        if name in meta_grad.grads:
            p.grad = meta_grad.grads[name]


def evaluate(loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution, *, n_tasks: int = 600,
             inner_steps: int = 1, batch_size: int = 100, seed: int = 1234,
             batching: Batching = "auto", device: torch.device | str = "cpu",
             return_per_task: bool = False) -> dict[str, Any]:
    """Post-adaptation performance on `n_tasks` fresh tasks from a seeded generator.

    Each task adapts from `loop.init(meta, task.init)` for `inner_steps` steps on its support
    set; the adapted model is scored on its query set. No meta-gradient is built.

    Returns:
      "meta_test_loss" and "meta_test_loss_ci95" (mean and 95% CI half-width over
      tasks), plus "test_accuracy" and "test_accuracy_ci95" for classification. With
      `return_per_task`, also "task_losses" (and "task_accuracies"): tensors [n_tasks] in
      task order, for paired comparisons of two methods on the same seeded tasks.
    """
    generator = torch.Generator().manual_seed(seed)

    def per_task(task: Task) -> tuple[Tensor, Tensor]:
        state = unroll(loop, loop.init(meta, task.init), task.support, meta, create_graph=False)
        pred = loop.predict(state, task.query.x)
        score = losses.accuracy(pred, task.query.y) if tasks.kind == "classification" else pred.new_zeros(())
        return loop.outer_loss_fn(pred, task.query.y), score

    task_losses, scores = [], []
    with torch.no_grad():  # torch.func.grad still computes the inner gradients
        for start in range(0, n_tasks, batch_size):
            batch = task_to(tasks.sample(min(batch_size, n_tasks - start), inner_steps, generator), device)
            _, prepared = resolve_batching(batch, batching)
            if isinstance(prepared, Task):  # vmap
                compressed, pattern = compress_support(prepared)
                loss, score = vmap_tasks(per_task, compressed, pattern)
            else:
                loss, score = (torch.stack(v) for v in zip(*(per_task(t) for t in prepared)))
            task_losses.append(loss)
            scores.append(score)
    all_losses, all_scores = torch.cat(task_losses), torch.cat(scores)
    metrics: dict[str, Any] = dict(zip(("meta_test_loss", "meta_test_loss_ci95"), mean_ci95(all_losses)))
    if tasks.kind == "classification":
        metrics.update(zip(("test_accuracy", "test_accuracy_ci95"), mean_ci95(all_scores)))
    if return_per_task:
        metrics["task_losses"] = all_losses.cpu()
        if tasks.kind == "classification":
            metrics["task_accuracies"] = all_scores.cpu()
    return metrics


def _first_plan(estimator: AbstractEstimator, loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution,
                meta_batch_size: int, inner_steps: int, budget: Budget, batching: Batching, seed: int,
                device: torch.device | str, meter: Meter | None) -> Plan:
    """Plan on a batch drawn from its own generator, so planning never changes the training tasks."""
    batch = task_to(tasks.sample(meta_batch_size, inner_steps, torch.Generator().manual_seed(seed + 7919)), device)
    if isinstance(estimator, Auto):
        return estimator.choose(loop, meta, batch, budget, batching, device, meter)
    return plan(estimator, loop, meta, batch, budget, batching=batching, device=device, meter=meter)


def meta_train(loop: InnerLoop, meta: MetaParams, estimator: AbstractEstimator, tasks: TaskDistribution, *,
               outer_optimizer: torch.optim.Optimizer, meta_steps: int, meta_batch_size: int = 25,
               inner_steps: int = 1, budget: Budget | None = None, batching: Batching = "auto",
               seed: int = 0, eval_tasks: TaskDistribution | None = None, eval_inner_steps: int | None = None,
               eval_n_tasks: int = 600, checkpoint_path: str | Path | None = None,
               checkpoint_every: int = 1000, log: LogFn | None = None, log_every: int = 100,
               progress: bool = True, device: torch.device | str = "cpu", on_nan: Literal["raise", "skip"] = "raise",
               memory_every: int = 1000, clock: Callable[[], float] | None = None,
               memory_probe: Callable[[], int] | None = None, meter: Meter | None = None,
               max_grad_norm: float | None = None, eval_batch_size: int = 100) -> dict:
    """Meta-train `meta` with `estimator` under a per-task budget, then evaluate on fresh tasks.

    Before the first step the meta-gradient is planned (`metaopt.planning`): its peak
    memory is predicted and fitted to `budget.memory` (vmap chunks, or task by task);
    a configuration that cannot fit raises `BudgetExceeded` before any training. Each
    meta-step samples `meta_batch_size` tasks, asks the estimator for a `MetaGrad`
    under the budget (a guard stops tasks that overrun, see `metaopt.guard`), writes
    it into `.grad` and steps the outer optimizer. Peak memory is measured on the
    first two meta-steps and every `memory_every` after. If `checkpoint_path` holds a
    checkpoint, training resumes from it; checkpoints are written atomically every
    `checkpoint_every` steps, at the end, and before any error leaves this function.

    Args:
      on_nan: a non-finite task loss either raises `FloatingPointError` naming the
        meta-step, the task and the inner step ("raise"), or the task is dropped from
        that meta-step and counted ("skip").
      clock, memory_probe: passed to the estimator's budget guard (tests inject them).
      meter: replaces the planner's memory measurement (see `metaopt.planning.Predictor`).
      max_grad_norm: clip the meta-gradient's global norm before each outer step (None: no
        clipping); long unrolls with learned step sizes (dataset distillation) spike without it.
      eval_n_tasks: 0 skips the final evaluation (the caller evaluates).
      eval_batch_size: meta-test tasks evaluated at once (one vmapped graph); lower it when
        a task is large (20-way Omniglot: 100 tasks at once need tens of GB).

    Returns:
      Metrics: "meta_steps", "estimator", "estimator_chosen", "predicted_peak_bytes",
      "measured_peak_bytes", "memory_method", "plan", "batching", "chunk_size",
      "tasks_truncated", "tasks_skipped", "tasks_nan_skipped", "meta_train_loss",
      "seconds_per_meta_step" (median), "train_seconds" (summed over resumed sessions), "history", and
      `evaluate`'s figures.
    """
    if meta_steps < 0 or meta_batch_size < 1 or inner_steps < 0:
        raise ValueError(f"meta_train: need meta_steps >= 0, meta_batch_size >= 1, inner_steps >= 0; "
                         f"got {meta_steps}, {meta_batch_size}, {inner_steps}")
    if on_nan not in ("raise", "skip"):
        raise ValueError(f"meta_train: on_nan must be 'raise' or 'skip', got {on_nan!r}")
    budget = budget if budget is not None else Budget()
    estimator.check(loop, meta)
    chosen = _first_plan(estimator, loop, meta, tasks, meta_batch_size, inner_steps, budget, batching, seed, device,
                         meter)
    logger.info("plan: %s, %s, chunks of %d tasks, predicted peak %s (%s)", describe(chosen.estimator),
                chosen.batching, chosen.chunk_size, format_bytes(chosen.predicted_peak_bytes), chosen.reason)
    generator = torch.Generator().manual_seed(seed)
    start_step, history, earlier_seconds = 0, [], 0.0
    counts = {"tasks_truncated": 0, "tasks_skipped": 0, "tasks_nan_skipped": 0}
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        ckpt = load_checkpoint(checkpoint_path)
        meta.load_state_dict(ckpt["meta"])
        outer_optimizer.load_state_dict(ckpt["outer_optimizer"])
        generator.set_state(ckpt["generator"])
        start_step, history = ckpt["meta_step"], ckpt["history"]
        counts.update(ckpt.get("counts", {}))
        earlier_seconds = ckpt.get("train_seconds", 0.0)  # training time before this resume

    def save(step: int) -> None:
        if checkpoint_path is not None:
            save_atomic({"meta": meta.state_dict(), "outer_optimizer": outer_optimizer.state_dict(),
                         "generator": generator.get_state(), "meta_step": step, "history": history,
                         "counts": counts, "estimator": estimator.name,
                         "train_seconds": earlier_seconds + time.perf_counter() - train_start}, checkpoint_path)

    step_seconds: list[float] = []
    recent: list[float] = []
    measured_peak, memory_method = -1, default_method(device)
    bar = tqdm(range(start_step, meta_steps), initial=start_step, total=meta_steps, disable=not progress,
               desc=f"meta-train ({estimator.name})", dynamic_ncols=True)
    train_start = time.perf_counter()
    step = start_step
    try:
        for step in bar:
            t0 = time.perf_counter()
            batch = task_to(tasks.sample(meta_batch_size, inner_steps, generator), device)

            def meta_gradient(these: Task | list[Task]) -> MetaGrad:
                return chosen.estimator(loop, meta, these, budget, batching=chosen.batching,
                                        chunk_size=chosen.chunk_size, clock=clock, memory_probe=memory_probe)

            if step - start_step < 2 or step % memory_every == 0:
                with measure_peak_memory(device, memory_method) as memory:
                    meta_grad = meta_gradient(batch)
                # Chunks run one after another, so the meta-step's peak is its largest chunk's: the
                # same unit as the prediction.
                measured_peak = max(measured_peak, memory.peak_bytes)
            else:
                meta_grad = meta_gradient(batch)
            meta_grad = _finite_or_handle(meta_grad, batch, step, on_nan, loop, meta, meta_gradient, counts)
            counts["tasks_truncated"] += int(meta_grad.stats["tasks_truncated"])
            counts["tasks_skipped"] += int(meta_grad.stats["tasks_skipped"])
            if meta_grad.stats["tasks_truncated"] or meta_grad.stats["tasks_skipped"]:
                logger.warning("meta-step %d: %d task(s) truncated, %d skipped (budget %s)", step,
                               meta_grad.stats["tasks_truncated"], meta_grad.stats["tasks_skipped"], budget)
            if meta_grad.stats["tasks_skipped"] == meta_grad.stats["tasks"]:
                continue  # nothing to learn from this meta-step; the counts say so
            loss = meta_grad.outer_loss.item()
            apply_meta_grad(meta, meta_grad)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(meta.parameters()), max_grad_norm)
            outer_optimizer.step()
            outer_optimizer.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - t0)
            recent.append(loss)
            if (step + 1) % log_every == 0 or step + 1 == meta_steps:
                entry = {"meta_step": step + 1, "meta_train_loss": statistics.fmean(recent) if recent else math.nan,
                         "seconds_per_meta_step": statistics.median(step_seconds[-max(len(recent), 1):]), **counts}
                history.append(entry)
                bar.set_postfix(loss=f"{entry['meta_train_loss']:.4f}")
                if not progress:  # no bar: say how it goes in the log (console and Hydra's train.log)
                    logger.info("meta-step %d/%d: meta_train_loss %.4f, %.3f s/meta-step", step + 1, meta_steps,
                                entry["meta_train_loss"], entry["seconds_per_meta_step"])
                if log is not None:
                    log(entry, step + 1)
                recent = []
            if checkpoint_every and (step + 1) % checkpoint_every == 0:
                save(step + 1)
    except BaseException:
        save(step)  # everything learned before the failing meta-step stays on disk
        raise
    finally:
        bar.close()
    train_seconds = earlier_seconds + time.perf_counter() - train_start  # all sessions of this run
    save(meta_steps)

    metrics: dict = {
        "meta_steps": meta_steps,
        "estimator": estimator.name,
        "estimator_chosen": chosen.estimator.name,
        "estimator_config": describe(chosen.estimator),
        "plan": chosen.reason,
        "batching": chosen.batching,
        "chunk_size": chosen.chunk_size,
        "predicted_peak_bytes": chosen.predicted_peak_bytes,
        "measured_peak_bytes": measured_peak,
        "memory_method": memory_method,
        "budget_memory_bytes": budget.memory,
        "budget_time_seconds": budget.time,
        **counts,
        "inner_steps": inner_steps,
        "meta_batch_size": meta_batch_size,
        "meta_train_loss": history[-1]["meta_train_loss"] if history else float("nan"),
        "seconds_per_meta_step": statistics.median(step_seconds) if step_seconds else float("nan"),
        "train_seconds": train_seconds,
    }
    if eval_n_tasks > 0:  # 0: the caller evaluates (e.g. several unroll lengths)
        metrics.update(evaluate(loop, meta, eval_tasks or tasks, n_tasks=eval_n_tasks,
                                inner_steps=inner_steps if eval_inner_steps is None else eval_inner_steps,
                                batch_size=eval_batch_size, batching=batching, device=device))
    metrics["history"] = history
    return metrics


def _finite_or_handle(meta_grad: MetaGrad, batch: Task, step: int, on_nan: str, loop: InnerLoop, meta: MetaParams,
                      meta_gradient: Callable[[Task | list[Task]], MetaGrad], counts: dict[str, int]) -> MetaGrad:
    """Check the tasks' losses and the meta-gradient; raise with the location, or drop the bad tasks."""
    losses, used = meta_grad.task_losses, meta_grad.task_used
    assert losses is not None and used is not None  # always set by AbstractEstimator.__call__
    bad = ~torch.isfinite(losses) & used
    grads_ok = all(bool(torch.isfinite(g).all()) for g in meta_grad.grads.values())
    if not bool(bad.any()) and grads_ok:
        return meta_grad
    tasks = unstack_tasks(batch)
    bad_indices = [int(i) for i in torch.nonzero(bad).flatten()] or list(range(len(tasks)))
    if on_nan == "skip":
        good = [t for i, t in enumerate(tasks) if i not in bad_indices]
        counts["tasks_nan_skipped"] += len(tasks) - len(good)
        logger.warning("meta-step %d: dropped %d task(s) with non-finite values", step, len(tasks) - len(good))
        if not good:
            return meta_grad._replace(stats={**meta_grad.stats, "tasks_skipped": len(tasks)})
        result = meta_gradient(good)
        if all(bool(torch.isfinite(g).all()) for g in result.grads.values()):
            return result
        bad_indices = list(range(len(tasks)))
    where = locate_nonfinite(loop, meta, tasks[bad_indices[0]])
    raise FloatingPointError(f"meta-step {step}, task {bad_indices[0]}: {where} "
                             f"(outer loss {losses[bad_indices[0]].item()}); use on_nan='skip' to drop such tasks")
