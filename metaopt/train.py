"""Meta-training: an explicit train state, one meta-step, and `meta_train`, a short driver around them.

`TrainState` holds everything a run carries from one meta-step to the next
(meta-parameters, outer optimizer, the task generator, counters, history) and
checkpoints and resumes as one object. `meta_step(state, batch, config)` plans
nothing and loops over nothing: it asks the planned estimator for a meta-gradient,
handles non-finite tasks, and steps the outer optimizer. `meta_train` plans once,
then loops: sample, step, record, checkpoint; and evaluates at the end.

The library returns a metrics dict and calls an optional `log` callback; it never
talks to a logger or a config system itself.
"""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metaopt.batching import Batching, unstack_tasks
from metaopt.budget import Budget
from metaopt.checkpoint import load_checkpoint, save_atomic
from metaopt.callbacks import Callback
from metaopt.diagnose import locate_nonfinite
from metaopt.estimators.base import MetaGrad, MetaGradientMethod
from metaopt.evaluation import evaluate, mean_ci95, task_to
from metaopt.guard import format_bytes
from metaopt.loop import InnerLoop
from metaopt.memory import Method, default_method, measure_peak_memory, tensor_bytes
from metaopt.planning import Meter, Plan, Timer, describe, plan
from metaopt.prefetch import Prefetcher
from metaopt.tasks.base import TaskDistribution
from metaopt.types import MetaParams, Task

__all__ = ["meta_train", "meta_step", "TrainState", "StepConfig", "evaluate", "mean_ci95", "apply_meta_grad",
           "task_to", "optimizer_state_bytes"]

LogFn = Callable[[dict[str, float], int], None]
logger = logging.getLogger("metaopt")


def apply_meta_grad(meta: MetaParams, meta_grad: MetaGrad) -> None:
    """Write a MetaGrad into `.grad` of the meta-parameters (the only place that does)."""
    for name, p in meta.named_parameters():
        if name in meta_grad.grads:
            p.grad = meta_grad.grads[name]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state `optimizer.step()` keeps for its parameters, measured exactly on a copy
    (zero gradients; the optimizer itself is untouched). Adam: two tensors per parameter."""
    if optimizer.state:
        return tensor_bytes(list(optimizer.state.values()))
    params = [p.detach().clone().requires_grad_(True) for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    copy = type(optimizer)(params, **optimizer.defaults)
    copy.step()
    return tensor_bytes(list(copy.state.values()))


@dataclass
class TrainState:
    """What a run carries between meta-steps; `state_dict` / `load_state_dict` checkpoint it as one object.

    Attributes:
      meta: the meta-parameters (updated in place by the outer optimizer).
      outer_optimizer: a torch optimizer over `meta.parameters()`.
      generator: the task sampler's random stream.
      step: meta-steps done.
      counts: tasks truncated / skipped under the budget / dropped as non-finite, summed over the run.
      history: one entry per logging interval (meta_step, meta_train_loss, seconds_per_meta_step, counts,
        and the validation metrics where validation ran).
      train_seconds: training wall-clock of earlier sessions of this run (before a resume).
      estimator: the planned estimator; a stochastic one (es, pes, random forward mode) draws from its
        own generators, which the checkpoint holds.
      carry: what an online estimator carries to each task's next window (`MetaGrad.carry`), or None.
      source: the task source's own state (`TaskDistribution.next_batch`: `metaopt.online.OnlineTasks`'
        pool of unrolls and their positions), or None.

    The checkpoint also holds torch's global random state (CPU and CUDA), from which vmapped dropout
    draws, so a resumed run draws what the uninterrupted run would have drawn: resume is bit-exact
    for every estimator.
    """

    meta: MetaParams
    outer_optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {
        "tasks_truncated": 0, "tasks_skipped": 0, "tasks_nan_skipped": 0})
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    estimator: Any = None
    carry: Any = None
    source: Any = None

    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"meta": self.meta.state_dict(), "outer_optimizer": self.outer_optimizer.state_dict(),
                "generator": self.generator.get_state(), "meta_step": self.step, "history": self.history,
                "counts": self.counts, "train_seconds": self.train_seconds, "rng": rng,
                "estimator_rng": self._estimator_rng(), "carry": self.carry, "task_source": self.source}

    def _estimator_rng(self) -> dict[str, Tensor]:
        rng_state = getattr(self.estimator, "rng_state", None)
        return rng_state() if rng_state is not None else {}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.meta.load_state_dict(ckpt["meta"])
        self.outer_optimizer.load_state_dict(ckpt["outer_optimizer"])
        self.generator.set_state(ckpt["generator"])
        self.step, self.history = ckpt["meta_step"], ckpt["history"]
        self.counts.update(ckpt.get("counts", {}))
        self.train_seconds = ckpt.get("train_seconds", 0.0)
        self.carry, self.source = ckpt.get("carry"), ckpt.get("task_source")
        if ckpt.get("estimator_rng") and self.estimator is not None:
            self.estimator.set_rng_state(ckpt["estimator_rng"])
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["cpu"])
            if "cuda" in ckpt["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])

    def finite(self) -> bool:
        """Whether every meta-parameter is finite (a state that is not is never checkpointed)."""
        return all(bool(torch.isfinite(p).all()) for p in self.meta.parameters())


@dataclass
class StepConfig:
    """How each meta-step runs (fixed for a run).

    Attributes:
      loop: the inner loop.
      plan: the planned estimator, batching and chunk size (`metaopt.planning.plan`).
      budget: the per-meta-step budget the run-time guard enforces.
      on_nan: "raise" (naming meta-step, task and inner step) or "skip" (drop the task, count it).
      max_grad_norm: clip the meta-gradient's global norm (None: no clipping).
      clock, memory_probe: the guard's clock and memory probe (tests inject them).
      lr_schedule: the outer learning rate at meta-step s (counted from 0) is the optimizer's initial
        lr times `lr_schedule(s)` (e.g. `metaopt.schedules.Cosine`); the initial lr is kept in each param
        group's "initial_lr", so it is checkpointed with the optimizer. None: a constant lr.
    """

    loop: InnerLoop
    plan: Plan
    budget: Budget
    on_nan: Literal["raise", "skip"] = "raise"
    max_grad_norm: float | None = None
    clock: Callable[[], float] | None = None
    memory_probe: Callable[[], int] | None = None
    lr_schedule: Callable[[int], float] | None = None

    def meta_gradient(self, meta: MetaParams, tasks: Task | list[Task]) -> MetaGrad:
        return self.plan.estimator(self.loop, meta, tasks, self.budget, batching=self.plan.batching,
                                   chunk_size=self.plan.chunk_size, clock=self.clock, memory_probe=self.memory_probe)


def meta_step(state: TrainState, batch: Task, config: StepConfig) -> tuple[TrainState, dict[str, float]]:
    """One outer step on a batch of tasks: meta-gradient, non-finite handling, optional clipping, optimizer step.

    Returns the state (its meta-parameters, optimizer and counters updated; `step` advanced) and
    this step's metrics: "meta_train_loss" (NaN when every task was skipped: no update then),
    "tasks", "tasks_truncated", "tasks_skipped".
    """
    meta_grad = config.meta_gradient(state.meta, batch)
    meta_grad, outer_loss = _finite_or_handle(meta_grad, batch, state, config)
    state.carry = meta_grad.carry
    stats = meta_grad.stats
    state.counts["tasks_truncated"] += int(stats["tasks_truncated"])
    state.counts["tasks_skipped"] += int(stats["tasks_skipped"])
    if stats["tasks_truncated"] or stats["tasks_skipped"]:
        logger.warning("meta-step %d: %d task(s) truncated, %d skipped (budget %s)", state.step,
                       stats["tasks_truncated"], stats["tasks_skipped"], config.budget)
    metrics = {"meta_train_loss": math.nan, "tasks": float(stats["tasks"]),
               "tasks_truncated": float(stats["tasks_truncated"]), "tasks_skipped": float(stats["tasks_skipped"])}
    state.step += 1
    if stats["tasks_skipped"] == stats["tasks"]:
        return state, metrics  # nothing to learn from this meta-step; the counts say so
    metrics["meta_train_loss"] = outer_loss
    apply_meta_grad(state.meta, meta_grad)
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(state.meta.parameters()), config.max_grad_norm)
    if config.lr_schedule is not None:
        factor = config.lr_schedule(state.step - 1)
        for group in state.outer_optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
    state.outer_optimizer.step()
    state.outer_optimizer.zero_grad(set_to_none=True)
    return state, metrics


def _finite_or_handle(meta_grad: MetaGrad, batch: Task, state: TrainState,
                      config: StepConfig) -> tuple[MetaGrad, float]:
    """Check the tasks' losses and the meta-gradient; raise with the location, or drop the bad tasks. Returns
    the meta-gradient to apply and its mean outer loss as a float (NaN where every task was dropped); when all is
    finite the loss comes in the same transfer as the flag: one host read per meta-step."""
    losses, used = meta_grad.task_losses, meta_grad.task_used
    assert losses is not None and used is not None  # always set by the runner
    bad = ~torch.isfinite(losses) & used
    device = next(iter(meta_grad.grads.values())).device
    finite = ~bad.any().to(device) & torch.isfinite(torch.stack(_largest_magnitudes(meta_grad.grads.values()))).all()
    loss = meta_grad.outer_loss.detach().reshape(()).to(device)
    all_finite, outer_loss = torch.stack([finite.to(loss.dtype), loss]).tolist()  # exact: a float of its dtype
    if all_finite:
        return meta_grad, outer_loss
    tasks = unstack_tasks(batch)
    bad_indices = [int(i) for i in torch.nonzero(bad).flatten()] or list(range(len(tasks)))
    if config.on_nan == "skip":
        good = [t for i, t in enumerate(tasks) if i not in bad_indices]
        state.counts["tasks_nan_skipped"] += len(tasks) - len(good)
        logger.warning("meta-step %d: dropped %d task(s) with non-finite values", state.step, len(tasks) - len(good))
        if not good:
            return meta_grad._replace(stats={**meta_grad.stats, "tasks_skipped": len(tasks)}, carry=None), math.nan
        result = config.meta_gradient(state.meta, good)._replace(carry=None)  # the dropped tasks' carry is gone
        if bool(torch.isfinite(torch.stack(_largest_magnitudes(result.grads.values()))).all()):
            return result, result.outer_loss.item()
        bad_indices = list(range(len(tasks)))
    where = locate_nonfinite(config.loop, state.meta, tasks[bad_indices[0]])
    raise FloatingPointError(f"meta-step {state.step}, task {bad_indices[0]}: {where} "
                             f"(outer loss {losses[bad_indices[0]].item()}); use on_nan='skip' to drop such tasks")


def _largest_magnitudes(tensors: Iterable[Tensor]) -> list[Tensor]:
    """Each non-empty tensor's largest |entry| (0-d tensors, on its device): NaN or inf exactly where the tensor
    has a non-finite entry. Two multi-tensor ops for all of them (fused kernels on CUDA), not two per tensor:
    on a GPU the train loop's host time per meta-step is what the whole step adds to the bare meta-gradient."""
    present = [t for t in tensors if t.numel()]
    return list(torch._foreach_max(torch._foreach_abs(present))) if present else [torch.zeros(())]


class _Recorder:
    """History entries every `log_every` steps, at the last step and where a callback asks for one; each entry
    goes through the callbacks (in order), then to the progress bar or log line and the caller's `log`."""

    def __init__(self, state: TrainState, meta_steps: int, log_every: int, log: LogFn | None, progress: bool,
                 name: str, callbacks: Sequence[Callback] = ()):
        self.meta_steps, self.log_every, self.log, self.progress = meta_steps, log_every, log, progress
        self.callbacks = list(callbacks)
        self.bar = tqdm(range(state.step, meta_steps), initial=state.step, total=meta_steps, disable=not progress,
                        desc=f"meta-train ({name})", dynamic_ncols=True)
        self.first = state.step  # the first meta-step of this session
        self.step_seconds: list[float] = []
        self.recent: list[float] = []

    def record(self, state: TrainState, metrics: dict[str, float], seconds: float) -> None:
        if not math.isnan(metrics["meta_train_loss"]):
            self.step_seconds.append(seconds)
            self.recent.append(metrics["meta_train_loss"])
        last = state.step == self.meta_steps
        if state.step % self.log_every and not last and not any(c.due(state.step) for c in self.callbacks):
            return
        entry = {"meta_step": state.step,
                 "meta_train_loss": statistics.fmean(self.recent) if self.recent else math.nan,
                 "seconds_per_meta_step": statistics.median(self.step_seconds[-max(len(self.recent), 1):])
                 if self.step_seconds else math.nan, **state.counts}
        state.history.append(entry)
        for callback in self.callbacks:
            callback.on_entry(state, entry, last)
        self.bar.set_postfix(loss=f"{entry['meta_train_loss']:.4f}")
        if not self.progress:  # no bar: say how it goes in the log (console and Hydra's train.log)
            logger.info("meta-step %d/%d: meta_train_loss %.4f, %.3f s/meta-step", state.step, self.meta_steps,
                        entry["meta_train_loss"], entry["seconds_per_meta_step"])
        if self.log is not None:
            self.log(entry, state.step)
        self.recent = []


def _check_arguments(meta_steps: int, meta_batch_size: int, inner_steps: int, on_nan: str) -> None:
    if meta_steps < 0 or meta_batch_size < 1 or inner_steps < 0:
        raise ValueError(f"meta_train: need meta_steps >= 0, meta_batch_size >= 1, inner_steps >= 0; "
                         f"got {meta_steps}, {meta_batch_size}, {inner_steps}")
    if on_nan not in ("raise", "skip"):
        raise ValueError(f"meta_train: on_nan must be 'raise' or 'skip', got {on_nan!r}")


def plan_training(estimator: MetaGradientMethod, loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution,
                  outer_optimizer: torch.optim.Optimizer, *, meta_batch_size: int, inner_steps: int, budget: Budget,
                  batching: Batching = "auto", seed: int = 0, device: torch.device | str = "cpu",
                  meter: Meter | None = None, timer: Timer | None = None,
                  resumed_batching: str | None = None) -> Plan:
    """The plan of a run's meta-steps, on a batch drawn from its own generator (planning never changes the
    training tasks); the outer optimizer's state counts in the prediction. Under "auto", a resumed run keeps
    `resumed_batching`, the batching its checkpoint recorded: "auto" times the batchings against each other, and
    a timing on a loaded machine could pick another one for the resumed session, whose sums would then round
    differently (resuming would not be bit-exact); where it can no longer run (e.g. another model), afresh."""
    batch = task_to(tasks.sample(meta_batch_size, inner_steps, torch.Generator().manual_seed(seed + 7919)), device)

    def planned(batching: Batching) -> Plan:
        return plan(estimator, loop, meta, batch, budget, batching=batching, device=device, meter=meter, timer=timer,
                    fixed_bytes=optimizer_state_bytes(outer_optimizer))
    kept = cast(Batching, resumed_batching) if resumed_batching and batching == "auto" else None
    try:
        chosen = planned(kept or batching)
    except ValueError as error:
        if kept is None:
            raise
        logger.warning("resuming: the checkpoint's batching %r cannot run (%s); planning afresh", resumed_batching,
                       error)
        chosen = planned(batching)
    logger.info("plan: %s, %s, chunks of %d tasks, predicted peak %s (%s)", describe(chosen.estimator),
                chosen.batching, chosen.chunk_size, format_bytes(chosen.predicted_peak_bytes), chosen.reason)
    if tasks.windowed and not getattr(chosen.estimator, "online", False):
        raise ValueError(f"meta_train: {tasks!r} gives windows of longer unrolls, which only an online estimator "
                         f"can continue (e.g. online_pes); got {describe(chosen.estimator)}")
    return chosen


def _plan_and_state(estimator: MetaGradientMethod, loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution,
                    outer_optimizer: torch.optim.Optimizer, checkpoint_path: str | Path | None, seed: int,
                    **planning: Any) -> tuple[Plan, TrainState]:
    """The run's plan (`plan_training` with `planning`) and its train state, resumed from the checkpoint at
    `checkpoint_path` where there is one (the plan then keeps the batching it recorded)."""
    resumed = load_checkpoint(checkpoint_path) if checkpoint_path is not None and Path(checkpoint_path).exists() \
        else None
    chosen = plan_training(estimator, loop, meta, tasks, outer_optimizer, seed=seed,
                           resumed_batching=(resumed or {}).get("batching"), **planning)
    state = TrainState(meta, outer_optimizer, torch.Generator().manual_seed(seed), estimator=chosen.estimator)
    if resumed is not None:
        state.load_state_dict(resumed)
    return chosen, state


def meta_train(loop: InnerLoop, meta: MetaParams, estimator: MetaGradientMethod, tasks: TaskDistribution, *,
               outer_optimizer: torch.optim.Optimizer, meta_steps: int, meta_batch_size: int = 25,
               inner_steps: int = 1, budget: Budget | None = None, batching: Batching = "auto",
               seed: int = 0, eval_tasks: TaskDistribution | None = None, eval_inner_steps: int | None = None,
               eval_n_tasks: int = 600, checkpoint_path: str | Path | None = None,
               checkpoint_every: int = 1000, log: LogFn | None = None, log_every: int = 100,
               progress: bool = True, device: torch.device | str = "cpu", on_nan: Literal["raise", "skip"] = "raise",
               memory_every: int = 1000, clock: Callable[[], float] | None = None,
               memory_probe: Callable[[], int] | None = None, meter: Meter | None = None, timer: Timer | None = None,
               max_grad_norm: float | None = None, eval_batch_size: int = 100,
               checkpoint_extra: dict[str, Any] | None = None, callbacks: Sequence[Callback] = (),
               lr_schedule: Callable[[int], float] | None = None, time_limit: float | None = None,
               prefetch: bool | None = None) -> dict:
    """Meta-train `meta` with `estimator` (or the `auto` policy) under a budget, then evaluate on fresh tasks.

    Before the first step the meta-step is planned (`plan_training`): its peak memory is
    predicted and fitted to `budget.memory` (vmap chunks, or task by task); a configuration
    that cannot fit raises `BudgetExceeded` before any training. Each meta-step samples
    `meta_batch_size` tasks and runs `meta_step` (a guard stops tasks that overrun, see
    `metaopt.guard`). The peak memory of the whole meta-step (sampling, every chunk forward and
    backward, the optimizer step) is measured on the first two meta-steps and every
    `memory_every` after. If `checkpoint_path` holds a checkpoint, training resumes from it;
    checkpoints are written atomically every `checkpoint_every` steps, at the end, and before
    any error leaves this function.

    Args:
      on_nan, max_grad_norm: see `StepConfig`.
      clock, memory_probe: passed to the budget guard (tests inject them).
      meter, timer: replace the planner's memory measurement and its timing of vmap against one task at a time
        (see `metaopt.prediction.Meter` and `Timer`).
      eval_n_tasks: 0 skips the final evaluation (the caller evaluates).
      eval_batch_size: meta-test tasks evaluated at once at most (fewer where the budget needs it).
      checkpoint_extra: more entries for the checkpoint (e.g. the run's resolved config).
      callbacks: hooks on the history entries, in order (`metaopt.callbacks`): e.g.
        `Validation(validate, every)` (validation metrics join the entries and the returned metrics) and
        `CollapseGuard(...)` (rolls back or stops a collapsing run, `metaopt.collapse`).
      lr_schedule: the outer learning rate's multiplier by meta-step (see `StepConfig`; `metaopt.schedules`).
      time_limit: seconds of training (over resumed sessions; not evaluation): no meta-step starts that the
        median step says would end past it; then "stopped_at_time_limit" (not a failure), "meta_steps" ran.
      prefetch: draw each meta-step's tasks on a worker thread while the step before computes
        (`metaopt.prefetch`: the same tasks, checkpoints as without). None: on CUDA devices, for distributions
        whose next batch ignores the last meta-step (`next_batch` not overridden, e.g. not `OnlineTasks`); True
        asks for it anywhere (refused for such a distribution), False never. Exact where the distribution draws
        from the generator it is given (every built-in one does), not from torch's global generator.

    Returns:
      Metrics: "meta_steps", "estimator", "estimator_chosen", "predicted_peak_bytes",
      "measured_peak_bytes", "memory_method", "plan", "batching", "chunk_size",
      "tasks_truncated", "tasks_skipped", "tasks_nan_skipped", "meta_train_loss",
      "seconds_per_meta_step" (median), "train_seconds" (summed over resumed sessions), "history", and
      `evaluate`'s figures (including "eval_peak_bytes").
    """
    _check_arguments(meta_steps, meta_batch_size, inner_steps, on_nan)
    budget = budget if budget is not None else Budget()
    estimator.check(loop, meta)
    tasks = tasks.to(device)  # where it can, the distribution samples on the device (the same tasks)
    chosen, state = _plan_and_state(estimator, loop, meta, tasks, outer_optimizer, checkpoint_path, seed,
                                    meta_batch_size=meta_batch_size, inner_steps=inner_steps, budget=budget,
                                    batching=batching, device=device, meter=meter, timer=timer)
    config = StepConfig(loop, chosen, budget, on_nan, max_grad_norm, clock, memory_probe, lr_schedule)
    save = _Checkpointer(state, checkpoint_path, {"estimator": estimator.name, "batching": chosen.batching,
                                                  **(checkpoint_extra or {})}, time_limit)
    recorder = _Recorder(state, meta_steps, log_every, log, progress, estimator.name, callbacks)
    memory_method = default_method(device)
    with _sampling(tasks, state, save, prefetch, device, meta_batch_size, inner_steps) as sample:
        measured_peak = _loop(state, config, sample, meta_steps, recorder, save, checkpoint_every,
                              lambda step: step - recorder.first < 2 or step % memory_every == 0, device,
                              memory_method)
    metrics: dict[str, Any] = _run_metrics(state, estimator, chosen, budget, recorder, measured_peak, memory_method,
                                           meta_steps=meta_steps, inner_steps=inner_steps,
                                           meta_batch_size=meta_batch_size, time_limit=time_limit)
    if eval_n_tasks > 0:  # 0: the caller evaluates (e.g. several unroll lengths)
        metrics.update(evaluate(loop, meta, eval_tasks or tasks, n_tasks=eval_n_tasks,
                                inner_steps=inner_steps if eval_inner_steps is None else eval_inner_steps,
                                batch_size=eval_batch_size, batching=batching, device=device, budget=budget))
    metrics["budget_exceeded"] = _over_budget(metrics, budget)
    for callback in callbacks:
        metrics.update(callback.on_end(state))
    metrics["history"] = state.history
    return metrics


class _Checkpointer:
    """Saves the train state atomically with `extra` entries, summing training time over sessions; never a
    state with non-finite meta-parameters (the last good checkpoint stays: a non-finite one could never resume).
    Also the run's clock: `time_left()` before `time_limit` seconds of training (inf without one). `rewind`:
    a context in which the state's generator is as the steps taken left it (`Prefetcher.rewound`)."""

    def __init__(self, state: TrainState, path: str | Path | None, extra: dict[str, Any],
                 time_limit: float | None = None):
        self.state, self.path, self.extra, self.time_limit = state, path, extra, time_limit
        self.session_start, self.earlier = time.perf_counter(), state.train_seconds
        self.rewind: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext

    def time_left(self) -> float:
        return math.inf if self.time_limit is None else self.time_limit - self.elapsed()

    def elapsed(self) -> float:
        """Seconds of training so far, earlier sessions included."""
        return self.earlier + time.perf_counter() - self.session_start

    def __call__(self) -> None:
        self.state.train_seconds = self.elapsed()
        if self.path is None:
            return
        if not self.state.finite():
            logger.warning("meta-step %d: meta-parameters are not finite; checkpoint not written", self.state.step)
            return
        with self.rewind():
            save_atomic({**self.state.state_dict(), **self.extra}, self.path)


def _loop(state: TrainState, config: StepConfig, sample: Callable[[], Task], meta_steps: int, recorder: _Recorder,
          save: _Checkpointer, checkpoint_every: int, measure_at: Callable[[int], bool],
          device: torch.device | str, memory_method: Method) -> int:
    """Meta-steps until `meta_steps` (or until `save.time_left()` is below the median step), checkpointing
    every `checkpoint_every` and at the end (also before any error leaves); returns the largest measured peak
    of a whole meta-step (-1 if none was measured)."""
    measured_peak = -1
    try:
        while state.step < meta_steps:
            if save.time_left() < (statistics.median(recorder.step_seconds[-50:]) if recorder.step_seconds else 0.0):
                logger.warning("meta-step %d of %d: stopping at the time limit", state.step, meta_steps)
                break
            t0 = time.perf_counter()
            measure = measure_at(state.step)
            with measure_peak_memory(device, memory_method if measure else "none") as memory:
                state, step_metrics = meta_step(state, sample(), config)
            measured_peak = max(measured_peak, memory.peak_bytes if measure else -1)
            recorder.record(state, step_metrics, time.perf_counter() - t0)
            recorder.bar.update()
            if checkpoint_every and state.step % checkpoint_every == 0:
                save()
    except BaseException:
        save()  # everything learned before the failing meta-step stays on disk (after a collapse: the best state)
        raise
    finally:
        recorder.bar.close()
    save()
    return measured_peak


@contextlib.contextmanager
def _sampling(tasks: TaskDistribution, state: TrainState, save: _Checkpointer, prefetch: bool | None,
              device: torch.device | str, meta_batch_size: int, inner_steps: int) -> Iterator[Callable[[], Task]]:
    """The training loop's `sample()`: each meta-step's tasks on `device`, drawn in turn or, with `prefetch`
    (see `meta_train`), a step ahead (then checkpoints rewind the generator; the worker stops on exit)."""
    independent = type(tasks).next_batch is TaskDistribution.next_batch
    if prefetch and not independent:
        raise ValueError(f"meta_train: prefetch=True, but {type(tasks).__name__}'s next batch depends on the last "
                         "meta-step (it overrides next_batch, e.g. online windows): it cannot be drawn ahead")
    if not independent or not (prefetch if prefetch is not None else torch.device(device).type == "cuda"):
        def sample() -> Task:
            batch, state.source = tasks.next_batch(meta_batch_size, inner_steps, state.generator, state.source,
                                                   state.carry)
            return task_to(batch, device)
        yield sample
        return
    prefetcher = Prefetcher(lambda: task_to(tasks.sample(meta_batch_size, inner_steps, state.generator), device),
                            state.generator, device)
    save.rewind = prefetcher.rewound
    try:
        yield prefetcher
    finally:
        prefetcher.close()
        save.rewind = contextlib.nullcontext


def _over_budget(metrics: dict[str, Any], budget: Budget) -> list[str]:
    """The measured peaks (training's meta-step, evaluation) above the memory budget, each said in the log."""
    over = [k for k in ("measured_peak_bytes", "eval_peak_bytes")
            if budget.memory is not None and metrics.get(k, -1) > budget.memory]
    for key in over:
        logger.warning("%s = %s is above the memory budget %s", key, format_bytes(metrics[key]),
                       format_bytes(budget.memory or 0))
    return over


def _run_metrics(state: TrainState, estimator: MetaGradientMethod, chosen: Plan, budget: Budget,
                 recorder: _Recorder, measured_peak: int, memory_method: str, **settings: Any) -> dict[str, Any]:
    return {
        "meta_steps": state.step,
        "meta_steps_asked": settings["meta_steps"],
        "stopped_at_time_limit": state.step < settings["meta_steps"],
        "time_limit": settings["time_limit"],
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
        "budget_headroom": budget.headroom,
        **state.counts,
        "inner_steps": settings["inner_steps"],
        "meta_batch_size": settings["meta_batch_size"],
        "meta_train_loss": state.history[-1]["meta_train_loss"] if state.history else float("nan"),
        "train_seconds": state.train_seconds,
        "seconds_per_meta_step": statistics.median(recorder.step_seconds) if recorder.step_seconds else math.nan,
    }
