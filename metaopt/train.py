"""Meta-training: `meta_train`, a short driver around the train state and one meta-step (`metaopt.step`).

`meta_train` plans once, then loops: sample, step, record, checkpoint; and evaluates at the end. On a GPU
the loop prefetches the next tasks (`metaopt.prefetch`) and runs one meta-step ahead of the device
(`metaopt.overlap`); both give the run the synchronous loop gives.

The library returns a metrics dict and calls an optional `log` callback; it never
talks to a logger or a config system itself.
"""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metaopt.batching import Batching
from metaopt.budget import Budget
from metaopt.checkpoint import load_checkpoint, save_atomic
from metaopt.compile_choice import choose_compiled
from metaopt.compiled import Compiled
from metaopt.callbacks import Callback
from metaopt.deadline import Deadline
from metaopt.estimators.base import AbstractEstimator, MetaGradientMethod
from metaopt.evaluation import evaluate, mean_ci95, plan_ahead, task_to
from metaopt.guard import format_bytes
from metaopt.loop import InnerLoop
from metaopt.memory import Method, default_method, measure_peak_memory, tensor_bytes
from metaopt.overlap import OptimizerUndo, undo_bytes
from metaopt.planning import Meter, Plan, Timer, describe, plan
from metaopt.prefetch import Prefetcher
from metaopt.step import (Launched, RandomState, StepConfig, TrainState, account, apply_meta_grad, launch, meta_step,
                          optimize, settle, updates)
from metaopt.tasks.base import TaskDistribution
from metaopt.types import MetaParams, Task

__all__ = ["meta_train", "meta_step", "TrainState", "StepConfig", "evaluate", "mean_ci95", "apply_meta_grad",
           "task_to", "optimizer_state_bytes"]

LogFn = Callable[[dict[str, float], int], None]
logger = logging.getLogger("metaopt")


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
        self.asked: dict[int, bool] = {}

    def entry_due(self, step: int) -> bool:
        """Whether an entry is written after meta-step `step` (counted from 1): a logging step, the last, or one a
        callback asks for (each callback's `due` is asked once per step)."""
        if step not in self.asked:  # an overlapped loop asks about a step before the one it records
            self.asked = {k: v for k, v in self.asked.items() if k >= step - 1}
            self.asked[step] = step % self.log_every == 0 or step == self.meta_steps or any(
                c.due(step) for c in self.callbacks)
        return self.asked[step]

    def seconds_after(self, step: int, meta: MetaParams) -> float:
        """The callbacks' predicted seconds after meta-step `step` (counted from 1) during training; none after the
        last (what follows it is reserved before training: `Callback.end_seconds`)."""
        return 0.0 if step >= self.meta_steps else sum(c.seconds_after(step, meta) for c in self.callbacks)

    def record(self, state: TrainState, metrics: dict[str, float], seconds: float) -> None:
        if not math.isnan(metrics["meta_train_loss"]):
            self.step_seconds.append(seconds)
            self.recent.append(metrics["meta_train_loss"])
        self.bar.update()
        last = state.step == self.meta_steps
        if not self.entry_due(state.step):
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
                  resumed_batching: str | None = None, overlap: bool = False, meta_steps: int = 0,
                  resumed_compiled: bool | None = None) -> Plan:
    """The plan of a run's meta-steps, on a batch drawn from its own generator (planning never changes the
    training tasks); the outer optimizer's state counts in the prediction. Under "auto", a resumed run keeps
    `resumed_batching`, the batching its checkpoint recorded: "auto" times the batchings against each other, and
    a timing on a loaded machine could pick another one for the resumed session, whose sums would then round
    differently (resuming would not be bit-exact); where it can no longer run (e.g. another model), afresh. So does
    `compile: auto`'s choice (`resumed_compiled`: whether the first session ran compiled)."""
    batch = task_to(tasks.sample(meta_batch_size, inner_steps, torch.Generator().manual_seed(seed + 7919)), device)

    state_bytes = optimizer_state_bytes(outer_optimizer)
    fixed = state_bytes + (undo_bytes(outer_optimizer, state_bytes) if overlap else 0)

    def planned(batching: Batching) -> Plan:
        if isinstance(estimator, Compiled) and estimator.choose and resumed_compiled is not None:  # compile: auto
            kept = plan(estimator if resumed_compiled else estimator.eager, loop, meta, batch, budget,
                        batching=batching, device=device, meter=meter, timer=timer, fixed_bytes=fixed)
            choice = "compiled" if resumed_compiled else "eager"
            return kept._replace(reason=f"{kept.reason}; compile: auto's choice ({choice}) kept from the checkpoint")
        if isinstance(estimator, Compiled) and estimator.choose:
            return choose_compiled(estimator, loop, meta, batch, budget, meta_steps=meta_steps, batching=batching,
                                   device=device, meter=meter, timer=timer, fixed_bytes=fixed)
        return plan(estimator, loop, meta, batch, budget, batching=batching, device=device, meter=meter, timer=timer,
                    fixed_bytes=fixed)
    kept = cast(Batching, resumed_batching) if resumed_batching and batching == "auto" else None
    try:
        chosen = planned(kept or batching)
    except ValueError as error:
        if kept is None:
            raise
        logger.warning("resuming: the checkpoint's batching %r cannot run (%s); planning afresh", resumed_batching,
                       error)
        chosen = planned(batching)
    call = "" if chosen.predicted_call_seconds is None else \
        f", ~{chosen.predicted_call_seconds:.3g} s per meta-gradient (its memory probes' calls, approximate)"
    logger.info("plan: %s, %s, chunks of %d tasks, predicted peak %s%s (%s)", describe(chosen.estimator),
                chosen.batching, chosen.chunk_size, format_bytes(chosen.predicted_peak_bytes), call, chosen.reason)
    if tasks.windowed and not getattr(chosen.estimator, "online", False):
        raise ValueError(f"meta_train: {tasks!r} gives windows of longer unrolls, which only an online estimator "
                         f"can continue (e.g. online_pes); got {describe(chosen.estimator)}")
    return chosen


def _with_resumed_per_pass(estimator: MetaGradientMethod, resumed: dict[str, Any] | None) -> MetaGradientMethod:
    """The estimator with the repetitions per pass that its checkpoint recorded, where they were the planner's
    choice (timed, like the batching: re-timed, a resumed session could choose otherwise and round otherwise)."""
    option = getattr(estimator, "per_pass", None)
    count = (resumed or {}).get("per_pass")
    if not isinstance(estimator, AbstractEstimator) or option is None or count is None \
            or getattr(estimator, option) is not None:
        return estimator
    return estimator.replaced(**{option: count})


def _per_pass(estimator: AbstractEstimator) -> int | None:
    """The repetitions per pass an estimator runs (None: it has none to choose)."""
    option = getattr(estimator, "per_pass", None)
    return getattr(estimator, option) if option else None


def _recorded(estimator: MetaGradientMethod, chosen: Plan) -> dict[str, Any]:
    """What a checkpoint keeps of the plan: what was chosen by timing (batching, repetitions per pass, `compile:
    auto`'s choice) is kept by a resumed session rather than timed again."""
    return {"estimator": estimator.name, "batching": chosen.batching, "per_pass": _per_pass(chosen.estimator),
            "compiled": isinstance(chosen.estimator, Compiled)}


def _plan_and_state(estimator: MetaGradientMethod, loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution,
                    outer_optimizer: torch.optim.Optimizer, checkpoint_path: str | Path | None, seed: int,
                    **planning: Any) -> tuple[Plan, TrainState]:
    """The run's plan (`plan_training` with `planning`) and its train state, resumed from the checkpoint at
    `checkpoint_path` where there is one (the plan then keeps the batching it recorded)."""
    resumed = load_checkpoint(checkpoint_path) if checkpoint_path is not None and Path(checkpoint_path).exists() \
        else None
    estimator = _with_resumed_per_pass(estimator, resumed)
    chosen = plan_training(estimator, loop, meta, tasks, outer_optimizer, seed=seed,
                           resumed_batching=(resumed or {}).get("batching"),
                           resumed_compiled=(resumed or {}).get("compiled"), **planning)
    state = TrainState(meta, outer_optimizer, torch.Generator().manual_seed(seed), estimator=chosen.estimator)
    if resumed is not None:
        state.load_state_dict(resumed)
    return chosen, state


def meta_train(loop: InnerLoop, meta: MetaParams, estimator: MetaGradientMethod, tasks: TaskDistribution, *,
               outer_optimizer: torch.optim.Optimizer, meta_steps: int, meta_batch_size: int = 25,
               inner_steps: int = 1, budget: Budget | None = None, batching: Batching = "auto", seed: int = 0,
               eval_tasks: TaskDistribution | None = None, eval_inner_steps: int | None = None, eval_n_tasks: int = 600,
               checkpoint_path: str | Path | None = None, checkpoint_every: int = 1000, log: LogFn | None = None,
               progress: bool = True, device: torch.device | str = "cpu", on_nan: Literal["raise", "skip"] = "raise",
               log_every: int = 100, memory_every: int = 1000, clock: Callable[[], float] | None = None,
               memory_probe: Callable[[], int] | None = None, meter: Meter | None = None, timer: Timer | None = None,
               max_grad_norm: float | None = None, eval_batch_size: int = 100, eval_batching: Batching | None = None,
               checkpoint_extra: dict[str, Any] | None = None, callbacks: Sequence[Callback] = (),
               lr_schedule: Callable[[int], float] | None = None, time_limit: float | None = None,
               prefetch: bool | None = None, overlap: bool | None = None,
               deadline: Deadline | None = None) -> dict:
    """Meta-train `meta` with `estimator` (or the `auto` policy) under a budget, then evaluate on fresh tasks.

    Before the first step the meta-step is planned (`plan_training`): its peak memory is predicted and fitted to
    `budget.memory` (vmap chunks, or task by task); a configuration that cannot fit raises `BudgetExceeded` before
    any training. Each meta-step samples `meta_batch_size` tasks and runs `meta_step` (a guard stops tasks that
    overrun, see `metaopt.guard`). The peak memory of the whole meta-step (sampling, every chunk forward and
    backward, the optimizer step) is measured on the first two meta-steps and every `memory_every` after (one where a
    compiled estimator compiles: "compile_peak_bytes", -1: none, as compile time is). Training resumes from the
    checkpoint at `checkpoint_path` if any; checkpoints are written atomically every `checkpoint_every` steps, at
    the end, and before any error leaves this function.

    Args:
      on_nan, max_grad_norm: see `StepConfig`.
      clock, memory_probe: passed to the budget guard (tests inject them).
      meter, timer: replace the planner's memory measurement and its timing of vmap against one task at a time
        (see `metaopt.prediction.Meter` and `Timer`).
      eval_n_tasks, eval_batch_size, eval_batching: 0 skips the final evaluation (the caller evaluates); tasks drawn
        at once; its batching (None: `batching`). It is planned before training (`metaopt.evaluation`).
      checkpoint_extra: more entries for the checkpoint (e.g. the run's resolved config).
      callbacks: hooks on the history entries, in order (`metaopt.callbacks`): e.g.
        `Validation(validate, every)` (validation metrics join the entries and the returned metrics) and
        `CollapseGuard(...)` (rolls back or stops a collapsing run, `metaopt.collapse`).
      lr_schedule: the outer learning rate's multiplier by meta-step (see `StepConfig`; `metaopt.schedules`).
      time_limit: seconds of training (over resumed sessions; not evaluation): no meta-step starts that the
        median step says would end past it; then "stopped_at_time_limit" (not a failure), "meta_steps" ran.
      deadline: this session's wall clock, evaluation included (`metaopt.deadline`): the final evaluation and the
        callbacks' end reserve their predicted seconds before any meta-step (`DeadlineExceeded` if nothing is left),
        and no meta-step starts that would end inside them; "stopped_by" names the limit that stopped training.
      prefetch, overlap: draw each meta-step's tasks on a worker thread while the step before computes
        (`metaopt.prefetch`); step the optimizer before reading the step's finiteness flag, read it after the
        next step is launched, undo a step found non-finite (`metaopt.overlap`; its copies count in the plan).
        Both give the synchronous loop's run (prefetching: where the distribution draws from the generator it is
        given, as every built-in one does). None: on CUDA, for distributions whose next batch ignores the last
        step (not `OnlineTasks`) and estimators that carry nothing; True: anywhere it can run; False: never.

    Returns:
      Metrics: "meta_steps", "estimator", "estimator_chosen", "predicted_peak_bytes", "measured_peak_bytes",
      "compile_peak_bytes", "predicted_chunk_seconds" (under a time budget), "predicted_call_seconds" (`Plan`'s),
      "memory_method", "plan", "batching", "chunk_size", "tasks_truncated", "tasks_skipped", "tasks_nan_skipped",
      "meta_train_loss", "seconds_per_meta_step" (median), "train_seconds" (summed over resumed sessions),
      "overlap", "history", `evaluate`'s figures; with a deadline, its `record()` ("job_time_limit", ...).
    """
    _check_arguments(meta_steps, meta_batch_size, inner_steps, on_nan)
    budget = budget if budget is not None else Budget()
    estimator.check(loop, meta)
    tasks = tasks.to(device)  # where it can, the distribution samples on the device (the same tasks)
    overlap = _overlaps(overlap, tasks, estimator, device)
    chosen, state = _plan_and_state(estimator, loop, meta, tasks, outer_optimizer, checkpoint_path, seed,
                                    meta_batch_size=meta_batch_size, inner_steps=inner_steps, budget=budget,
                                    meter=meter, batching=batching, device=device, timer=timer, overlap=overlap,
                                    meta_steps=meta_steps)
    config = StepConfig(loop, chosen, budget, on_nan, max_grad_norm, clock, memory_probe, lr_schedule)
    evaluation = _final_evaluation(loop, meta, eval_tasks or tasks, budget, eval_n_tasks, device=device,
                                   inner_steps=inner_steps if eval_inner_steps is None else eval_inner_steps,
                                   batch_size=eval_batch_size, batching=eval_batching or batching, deadline=deadline)
    _reserve_callbacks(deadline, callbacks, meta, state.step < meta_steps)
    save = _Checkpointer(state, checkpoint_path, _recorded(estimator, chosen) | (checkpoint_extra or {}), time_limit,
                         deadline)
    recorder = _Recorder(state, meta_steps, log_every, log, progress, estimator.name, callbacks)
    with _sampling(tasks, state, save, prefetch, device, meta_batch_size, inner_steps) as sample:
        peaks = _loop(state, config, sample, meta_steps, recorder, save, checkpoint_every, memory_every, device,
                      memory_method := default_method(device), overlap)
    metrics: dict[str, Any] = _run_metrics(state, estimator, chosen, budget, recorder, peaks, memory_method,
                                           meta_steps=meta_steps, inner_steps=inner_steps,
                                           meta_batch_size=meta_batch_size, time_limit=time_limit, overlap=overlap,
                                           stopped_by=save.stopped_by)
    return _completed(metrics, state, budget, evaluation, callbacks, deadline)


def _completed(metrics: dict[str, Any], state: TrainState, budget: Budget,
               evaluation: Callable[[], dict[str, Any]] | None, callbacks: Sequence[Callback],
               deadline: Deadline | None) -> dict[str, Any]:
    """The run's metrics once training is over: the final evaluation's (None: the caller evaluates, e.g. several
    unroll lengths), the peaks above the memory budget, the callbacks' at the end, the history, the deadline's."""
    if evaluation is not None:
        metrics.update(evaluation())
    metrics["budget_exceeded"] = _over_budget(metrics, budget)
    for callback in callbacks:
        metrics.update(callback.on_end(state))
    metrics["history"] = state.history
    if deadline is not None:
        metrics.update(deadline.record())
    return metrics


def _final_evaluation(loop: InnerLoop, meta: MetaParams, tasks: TaskDistribution, budget: Budget, n_tasks: int, *,
                      device: torch.device | str, deadline: Deadline | None = None,
                      **settings: Any) -> Callable[[], dict[str, Any]] | None:
    """The final evaluation, planned now, before training (None where `n_tasks` is 0): its plan and predicted
    seconds are in the log before any work (and reserved in `deadline`), and an evaluation that cannot run fails
    before the training it would follow. Call the result after training to evaluate `meta` as it is then."""
    if n_tasks <= 0:
        return None
    tasks = tasks.to(device)
    found = plan_ahead("the final evaluation", loop, meta, tasks, budget, n_tasks, deadline=deadline, device=device,
                       **settings)
    return lambda: evaluate(loop, meta, tasks, n_tasks=n_tasks, inner_steps=settings["inner_steps"],
                            batch_size=settings["batch_size"], device=device, budget=budget, plan=found)


def _reserve_callbacks(deadline: Deadline | None, callbacks: Sequence[Callback], meta: MetaParams,
                       to_train: bool) -> None:
    """Reserve in `deadline` each callback's predicted seconds at the end (`Callback.end_seconds`), then refuse
    (`DeadlineExceeded`) where nothing is left for training, if any is left to do (a resumed run whose training
    is done only evaluates: refusing it would save nothing)."""
    if deadline is None:
        return
    for callback in callbacks:
        seconds = callback.end_seconds(meta)
        if seconds != 0.0:
            deadline.reserve(f"{type(callback).__name__} at the end", seconds)
    if to_train:
        deadline.check()


class _Checkpointer:
    """Saves the train state atomically with `extra` entries, summing training time over sessions; never a
    state with non-finite meta-parameters (the last good checkpoint stays: a non-finite one could never resume).
    Also the run's clock: `time_left()` before `time_limit` seconds of training (inf without one) or before the
    `deadline`'s reservation, whichever is first (`stop()` records which in `stopped_by`). `rewind`:
    a context in which the state's generator is as the steps taken left it (`Prefetcher.rewound`)."""

    def __init__(self, state: TrainState, path: str | Path | None, extra: dict[str, Any],
                 time_limit: float | None = None, deadline: Deadline | None = None):
        self.state, self.path, self.extra, self.time_limit, self.deadline = state, path, extra, time_limit, deadline
        self.session_start, self.earlier = time.perf_counter(), state.train_seconds
        self.rewind: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        self.override: dict[str, Any] = {}  # entries that replace the state's (an overlapped loop's undone step)
        self.stopped_by: str | None = None

    def _left(self) -> tuple[float, float]:
        """Seconds left before `time_limit` and before the deadline's reservation (inf: no such limit)."""
        training = math.inf if self.time_limit is None else self.time_limit - self.elapsed()
        return training, math.inf if self.deadline is None else self.deadline.training_left()

    def time_left(self) -> float:
        return min(self._left())

    def stop(self) -> None:
        """Training stops for lack of time: say which limit."""
        training, job = self._left()
        self.stopped_by = "job_time_limit" if job < training else "time_limit"

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
            save_atomic({**self.state.state_dict(), **self.extra, **self.override}, self.path)


def _loop(state: TrainState, config: StepConfig, sample: Callable[[], Task], meta_steps: int, recorder: _Recorder,
          save: _Checkpointer, checkpoint_every: int, memory_every: int,
          device: torch.device | str, memory_method: Method, overlap: bool = False) -> dict[str, int]:
    """Meta-steps until `meta_steps` (or until `save.time_left()` is below the median step), checkpointing
    every `checkpoint_every` and at the end (also before any error leaves); returns "measured_peak_bytes", the
    largest measured peak of a whole meta-step (-1 if none was measured: the session's first two steps and every
    `memory_every`), and "compile_peak_bytes", that of the measured steps in which a compiled estimator traced a
    new shape (its `first_calls`; -1: none). With `overlap` (`metaopt.overlap`), a step after which nothing reads
    the state (no entry, checkpoint or memory measurement is due) runs ahead: its flag is read after the next step
    is launched."""
    peaks = {False: -1, True: -1}  # compiled in the step -> the largest measured peak
    ahead = _Ahead(state, config, recorder, save)
    try:
        while state.step + ahead.count < meta_steps:
            left = save.time_left()
            if left < math.inf and left < (statistics.median(recorder.step_seconds[-50:]) if recorder.step_seconds
                                           else 0.0) + recorder.seconds_after(state.step + ahead.count + 1, state.meta):
                save.stop()
                logger.warning("meta-step %d of %d: stopping at the %s", state.step, meta_steps,
                               "time limit" if save.stopped_by == "time_limit" else
                               "job time limit (the work after training keeps its predicted seconds)")
                break
            t0 = time.perf_counter()
            step = state.step + ahead.count  # this meta-step, counted from 0
            measure = step - recorder.first < 2 or step % memory_every == 0
            if overlap and not measure and not recorder.entry_due(step + 1) and step + 1 < meta_steps \
                    and not (checkpoint_every and (step + 1) % checkpoint_every == 0):
                ahead.step(sample, t0)
                continue
            ahead.finish(t0)
            first_calls = getattr(config.plan.estimator, "first_calls", 0)
            with measure_peak_memory(device, memory_method if measure else "none") as memory:
                state, step_metrics = meta_step(state, sample(), config)
            compiled = getattr(config.plan.estimator, "first_calls", 0) > first_calls
            peaks[compiled] = max(peaks[compiled], memory.peak_bytes if measure else -1)
            recorder.record(state, step_metrics, time.perf_counter() - t0)
            if checkpoint_every and state.step % checkpoint_every == 0:
                save()
        ahead.finish(time.perf_counter())
    except BaseException:
        ahead.drop()
        save()  # everything learned before the failing meta-step stays on disk (after a collapse: the best state)
        raise
    finally:
        recorder.bar.close()
    save()
    if save.deadline is not None:
        save.deadline.end_training()
    return {"measured_peak_bytes": peaks[False], "compile_peak_bytes": peaks[True]}


class _Ahead:
    """The meta-step that runs ahead in an overlapped loop (at most one): launched and optimized, its flag not
    yet read. `step` launches the next meta-step and then settles the one ahead; `finish` settles it;
    `drop` (on an error) keeps it if it was good and complete, else undoes it and points the checkpoint at the
    random state from before it (a resumed run then runs it again, as an uninterrupted one would have)."""

    def __init__(self, state: TrainState, config: StepConfig, recorder: _Recorder, save: _Checkpointer):
        self.state, self.config, self.recorder, self.save = state, config, recorder, save
        self.launched: Launched | None = None
        self.undo: OptimizerUndo | None = None
        self.before: dict[str, Any] = {}  # the generator and random streams before it
        self.started = 0.0
        self.optimized = False

    @property
    def count(self) -> int:
        return int(self.launched is not None)

    def step(self, sample: Callable[[], Task], t0: float) -> None:
        random = RandomState(self.state.estimator)
        before = {"generator": self.state.generator.get_state() if not isinstance(sample, Prefetcher)
                  else sample.next_state(), "random": random}
        batch = sample()
        launched = launch(self.state, batch, self.config)
        if self.launched is not None and not self._settle(t0, random):
            launched = launch(self.state, batch, self.config)  # again, at the meta-parameters of the handled step
        self.launched, self.before, self.started, self.optimized, self.undo = launched, before, t0, False, None
        self.undo = OptimizerUndo(self.state.outer_optimizer)
        if updates(launched.meta_grad):
            optimize(self.state, launched.meta_grad, self.config, self.state.step)
        self.optimized = True

    def finish(self, now: float) -> None:
        if self.launched is not None:
            self._settle(now, RandomState(self.state.estimator))

    def _settle(self, now: float, after: RandomState) -> bool:
        """Settle the step ahead (`after`: the random state the step after it started from); False where its
        flag was not finite: then it was undone and handled as the synchronous loop would have."""
        launched, undo = self.launched, self.undo
        assert launched is not None and undo is not None
        self.launched = None
        good = bool(launched.check.read()[0])
        if not good:
            undo.restore()
            after.restore()
            self.save.override = self._checkpoint_before()
        meta_grad, outer_loss = settle(self.state, launched, self.config)
        self.save.override = {}
        metrics = account(self.state, meta_grad, outer_loss, self.config)
        if not good and updates(meta_grad):
            optimize(self.state, meta_grad, self.config, self.state.step - 1)
        self.recorder.record(self.state, metrics, now - self.started)
        return good

    def _checkpoint_before(self) -> dict[str, Any]:
        return {"generator": self.before["generator"], **self.before["random"].entries}

    def drop(self) -> None:
        if self.launched is None:
            return
        if self.optimized and self.launched.check.read()[0]:
            self._settle(time.perf_counter(), RandomState(self.state.estimator))
            return
        if self.undo is not None:  # None: the error came before the copy, the optimizer untouched
            self.undo.restore()
        self.launched = None
        self.save.override = self._checkpoint_before()


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


def _overlaps(overlap: bool | None, tasks: TaskDistribution, estimator: MetaGradientMethod,
              device: torch.device | str) -> bool:
    """Whether the loop overlaps meta-steps (`meta_train`'s `overlap`); refuses True where it cannot run."""
    why = ("its next batch depends on the last meta-step" if type(tasks).next_batch is not TaskDistribution.next_batch
           else "the estimator carries state between meta-steps" if getattr(estimator, "online", False) else None)
    if overlap and why:
        raise ValueError(f"meta_train: overlap=True, but {why} ({type(tasks).__name__}, {estimator.name}): a step "
                         "cannot be launched before the one before it is settled")
    return not why and (overlap if overlap is not None else torch.device(device).type == "cuda")


def _over_budget(metrics: dict[str, Any], budget: Budget) -> list[str]:
    """The measured peaks (training's meta-step, evaluation) above the memory budget, each said in the log."""
    over = [k for k in ("measured_peak_bytes", "eval_peak_bytes")
            if budget.memory is not None and metrics.get(k, -1) > budget.memory]
    for key in over:
        logger.warning("%s = %s is above the memory budget %s", key, format_bytes(metrics[key]),
                       format_bytes(budget.memory or 0))
    return over


def _run_metrics(state: TrainState, estimator: MetaGradientMethod, chosen: Plan, budget: Budget,
                 recorder: _Recorder, peaks: dict[str, int], memory_method: str, **settings: Any) -> dict[str, Any]:
    return {
        "meta_steps": state.step,
        "meta_steps_asked": settings["meta_steps"],
        "stopped_at_time_limit": state.step < settings["meta_steps"],
        "time_limit": settings["time_limit"],
        "stopped_by": settings["stopped_by"],
        "estimator": estimator.name,
        "estimator_chosen": chosen.estimator.name,
        "estimator_config": describe(chosen.estimator),
        "plan": chosen.reason,
        "batching": chosen.batching,
        "chunk_size": chosen.chunk_size,
        "predicted_peak_bytes": chosen.predicted_peak_bytes,
        "predicted_chunk_seconds": chosen.predicted_chunk_seconds,
        "predicted_call_seconds": chosen.predicted_call_seconds,
        **peaks,
        "memory_method": memory_method,
        "budget_memory_bytes": budget.memory,
        "budget_time_seconds": budget.time,
        "budget_headroom": budget.headroom,
        **state.counts,
        "inner_steps": settings["inner_steps"],
        "overlap": settings["overlap"],
        "meta_batch_size": settings["meta_batch_size"],
        "meta_train_loss": state.history[-1]["meta_train_loss"] if state.history else float("nan"),
        "train_seconds": state.train_seconds,
        "seconds_per_meta_step": statistics.median(recorder.step_seconds) if recorder.step_seconds else math.nan,
    }
