"""Meta-training: outer optimizer, evaluation, checkpoint/resume, metrics.

The library returns a metrics dict and calls an optional `log` callback; it never
talks to a logger or a config system itself.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metaopt import losses
from metaopt.batching import Batching, resolve_batching
from metaopt.budget import Budget
from metaopt.checkpoint import load_checkpoint, save_atomic
from metaopt.estimators.base import AbstractEstimator, MetaGrad
from metaopt.loop import InnerLoop, unroll
from metaopt.tasks.base import TaskDistribution
from metaopt.types import MetaParams, Task

__all__ = ["meta_train", "evaluate", "mean_ci95", "apply_meta_grad", "task_to"]

LogFn = Callable[[dict[str, float], int], None]


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval (1.96 s / sqrt(n))."""
    values = values.detach().double().flatten()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else float("nan")
    return values.mean().item(), 1.96 * std / math.sqrt(n)


def task_to(task: Task, device: torch.device | str) -> Task:
    """The task with every tensor moved to `device`."""
    return torch.utils._pytree.tree_map(lambda v: v.to(device), task)


def apply_meta_grad(meta: MetaParams, meta_grad: MetaGrad) -> None:
    """Write a MetaGrad into `.grad` of the meta-parameters (the only place that does)."""
    for name, p in meta.named_parameters():
        if name in meta_grad.grads:
            p.grad = meta_grad.grads[name]


def evaluate(loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution, *, n_tasks: int = 600,
             inner_steps: int = 1, batch_size: int = 100, seed: int = 1234,
             batching: Batching = "auto", device: torch.device | str = "cpu") -> dict[str, float]:
    """Post-adaptation performance on `n_tasks` fresh tasks from a seeded generator.

    Each task adapts from `loop.init(meta)` for `inner_steps` steps on its support
    set; the adapted model is scored on its query set. No meta-gradient is built.

    Returns:
      "meta_test_loss" and "meta_test_loss_ci95" (mean and 95% CI half-width over
      tasks), plus "test_accuracy" and "test_accuracy_ci95" for classification.
    """
    generator = torch.Generator().manual_seed(seed)

    def per_task(task: Task) -> tuple[Tensor, Tensor]:
        state = unroll(loop, loop.init(meta), task.support, meta, create_graph=False)
        pred = loop.predict(state, task.query.x)
        score = losses.accuracy(pred, task.query.y) if tasks.kind == "classification" else pred.new_zeros(())
        return loop.outer_loss_fn(pred, task.query.y), score

    task_losses, scores = [], []
    with torch.no_grad():  # torch.func.grad still computes the inner gradients
        for start in range(0, n_tasks, batch_size):
            batch = task_to(tasks.sample(min(batch_size, n_tasks - start), inner_steps, generator), device)
            mode, prepared = resolve_batching(batch, batching)
            if mode == "vmap":
                loss, score = torch.func.vmap(per_task, randomness="different")(prepared)
            else:
                loss, score = (torch.stack(v) for v in zip(*(per_task(t) for t in prepared)))
            task_losses.append(loss)
            scores.append(score)
    metrics = dict(zip(("meta_test_loss", "meta_test_loss_ci95"), mean_ci95(torch.cat(task_losses))))
    if tasks.kind == "classification":
        metrics.update(zip(("test_accuracy", "test_accuracy_ci95"), mean_ci95(torch.cat(scores))))
    return metrics


def meta_train(loop: InnerLoop, meta: MetaParams, estimator: AbstractEstimator, tasks: TaskDistribution, *,
               outer_optimizer: torch.optim.Optimizer, meta_steps: int, meta_batch_size: int = 25,
               inner_steps: int = 1, budget: Budget | None = None, batching: Batching = "auto",
               seed: int = 0, eval_tasks: TaskDistribution | None = None, eval_inner_steps: int | None = None,
               eval_n_tasks: int = 600, checkpoint_path: str | Path | None = None,
               checkpoint_every: int = 1000, log: LogFn | None = None, log_every: int = 100,
               progress: bool = True, device: torch.device | str = "cpu") -> dict:
    """Meta-train `meta` with `estimator`, then evaluate on fresh tasks.

    Each meta-step samples `meta_batch_size` tasks, asks the estimator for a
    `MetaGrad`, writes it into `.grad` and steps the outer optimizer. If
    `checkpoint_path` holds a checkpoint, training resumes from it (meta-parameters,
    outer optimizer, task generator, step count); checkpoints are written
    atomically every `checkpoint_every` steps and at the end.

    Returns:
      Metrics: "meta_steps", "estimator", "meta_train_loss" (mean of the last
      `log_every` steps), "seconds_per_meta_step" (median), "train_seconds",
      "history" (one entry per `log_every` steps), and `evaluate`'s figures.

    Raises:
      FloatingPointError: a meta-step's outer loss is NaN or inf (names the step).
    """
    if meta_steps < 0 or meta_batch_size < 1 or inner_steps < 0:
        raise ValueError(f"meta_train: need meta_steps >= 0, meta_batch_size >= 1, inner_steps >= 0; "
                         f"got {meta_steps}, {meta_batch_size}, {inner_steps}")
    budget = budget if budget is not None else Budget()
    estimator.check(loop, meta)
    generator = torch.Generator().manual_seed(seed)
    start_step, history = 0, []
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        ckpt = load_checkpoint(checkpoint_path)
        meta.load_state_dict(ckpt["meta"])
        outer_optimizer.load_state_dict(ckpt["outer_optimizer"])
        generator.set_state(ckpt["generator"])
        start_step, history = ckpt["meta_step"], ckpt["history"]

    def save(step: int) -> None:
        if checkpoint_path is not None:
            save_atomic({"meta": meta.state_dict(), "outer_optimizer": outer_optimizer.state_dict(),
                         "generator": generator.get_state(), "meta_step": step, "history": history,
                         "estimator": estimator.name}, checkpoint_path)

    step_seconds: list[float] = []
    recent: list[float] = []
    bar = tqdm(range(start_step, meta_steps), initial=start_step, total=meta_steps, disable=not progress,
               desc=f"meta-train ({estimator.name})", dynamic_ncols=True)
    train_start = time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        batch = task_to(tasks.sample(meta_batch_size, inner_steps, generator), device)
        meta_grad = estimator(loop, meta, batch, budget, batching=batching)
        loss = meta_grad.outer_loss.item()
        if not math.isfinite(loss):
            save(step)
            raise FloatingPointError(f"meta-step {step}: outer loss is {loss} ({estimator.name}, "
                                     f"inner_steps={inner_steps}); meta-parameters before this step are "
                                     f"saved in {checkpoint_path}")
        apply_meta_grad(meta, meta_grad)
        outer_optimizer.step()
        outer_optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t0)
        recent.append(loss)
        if (step + 1) % log_every == 0 or step + 1 == meta_steps:
            entry = {"meta_step": step + 1, "meta_train_loss": statistics.fmean(recent),
                     "seconds_per_meta_step": statistics.median(step_seconds[-len(recent):])}
            history.append(entry)
            bar.set_postfix(loss=f"{entry['meta_train_loss']:.4f}")
            if log is not None:
                log(entry, step + 1)
            recent = []
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            save(step + 1)
    bar.close()
    train_seconds = time.perf_counter() - train_start
    save(meta_steps)

    metrics: dict = {
        "meta_steps": meta_steps,
        "estimator": estimator.name,
        "inner_steps": inner_steps,
        "meta_batch_size": meta_batch_size,
        "meta_train_loss": history[-1]["meta_train_loss"] if history else float("nan"),
        "seconds_per_meta_step": statistics.median(step_seconds) if step_seconds else float("nan"),
        "train_seconds": train_seconds,
    }
    metrics.update(evaluate(loop, meta, eval_tasks or tasks, n_tasks=eval_n_tasks,
                            inner_steps=inner_steps if eval_inner_steps is None else eval_inner_steps,
                            batching=batching, device=device))
    metrics["history"] = history
    return metrics
