"""Predicting the peak memory of a meta-gradient call before running it.

`Predictor.predict` measures the call *as it will run* — the whole batch of
tasks, in its vmapped chunks or task by task, forward and backward, gradients
accumulated across chunks (`metaopt.runner.run_meta_gradient`) — on the tasks cut
to a few inner steps, and extrapolates to T with the estimator's own growth law
(`AbstractEstimator.predict_peak_bytes`). Every configuration is warmed up once at
2 inner steps first, so one-off costs of a process's first call (measured: 112 MB for
a chunk that then takes 30 MB) are paid before measuring, as they are before
training's first measured meta-step.

`Predictor.seconds` times calls the same way (for the planner's choice between vmapped
chunks and one task at a time): wall-clock seconds, so approximate and load-dependent;
the configurations alternate and each keeps its fastest call. `Predictor.predict_seconds`
extrapolates such timings at a few inner steps to T (`AbstractEstimator.predict_seconds`),
for the planner's check against a time budget. `Predictor.probed_seconds` is the free, rougher
figure: the memory probes' own calls, each timed once as it ran, extrapolated to T (what the
explorer prices a trial's time with, calibrated by the trials it has run).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

from metaopt.batching import Batching, compress_support, expand_support, unstack_tasks
from metaopt.estimators.base import AbstractEstimator, linear_seconds
from metaopt.loop import InnerLoop
from metaopt.memory import Method, measure_peak_memory
from metaopt.runner import resolve_for
from metaopt.types import MetaParams, Task

__all__ = ["Meter", "Timer", "Predictor", "describe", "REFINE_FROM", "TIMED_STEPS"]

REFINE_FROM = 129
"""From this T on, a prediction is refined with probes at T/4 and T/2 (costing about 0.75 of a real
call) unless the coarse one (probes at 16 and 64 steps) is above twice the limit: a probe at T/2 is
then predicted to stay under the limit, so refining never runs what could not fit."""

Meter = Callable[[AbstractEstimator, "Task | list[Task]", str], int]
"""`meter(estimator, tasks, batching) -> peak bytes` of one graph (one task, or one vmapped chunk):
a deterministic stand-in for the measurement in tests. Chunks run one after another and release
their graphs, so with a meter the peak of a chunked call is its first (largest) chunk's."""


Timer = Callable[[AbstractEstimator, "Task | list[Task]", str], float]
"""`timer(estimator, tasks, batching) -> seconds` of one whole call (all of `tasks`; "vmap": one vmapped
graph per chunk, "loop": task by task): a deterministic stand-in for `Predictor.seconds` in tests."""

TIMED_STEPS = 16
"""Inner steps of the calls `Predictor.seconds` times (fewer where the tasks have fewer): the ratio between
two batchings of the same tasks, not the seconds at T, is what the planner compares."""


def describe(estimator: AbstractEstimator) -> str:
    """`checkpoint(segment=10)`: the registry name and the constructor arguments (`compiled(full())` for a
    `metaopt.compiled.Compiled` wrapper)."""
    eager = getattr(estimator, "eager", None)
    if eager is not None:
        return f"compiled({describe(eager)})"
    return f"{estimator.name}({', '.join(f'{k}={v!r}' for k, v in estimator.arguments().items())})"


def seconds_of(call: Callable[[], object], device: torch.device | str) -> float:
    """Wall-clock seconds of `call()`, the device synchronized before and after (CUDA runs asynchronously)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class Predictor:
    """Measures probes of estimators on one batch of tasks and predicts their peak memory.

    Measurements are cached per (estimator, steps, tasks, chunk size), so planning
    several candidates on the same batch shares them.

    Args:
      loop, meta: the inner loop and meta-parameters.
      tasks: the batch of tasks to plan for (stacked, or a list).
      device: where the tasks run (selects the memory method).
      method: `metaopt.memory` method ("auto": allocator on CUDA, RSS on CPU).
      meter: replaces the measurement (see `Meter`).
      limit: the bytes a plan may take (refinement probes run only where they are predicted to fit).
      timer: replaces the timing (see `Timer`). With a `meter` and no `timer` nothing is timed
        (`can_time` is False): a stand-in measurement runs no calls to time.
      batching: the batching asked of the plan: chunks of more than one task are measured "stacked" or
        "vmap" where it names one, else as "auto" resolves them (what the plan then runs).
    """

    def __init__(self, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                 device: torch.device | str = "cpu", method: Method = "auto", meter: Meter | None = None,
                 limit: float = math.inf, timer: Timer | None = None, batching: Batching = "auto"):
        self.loop, self.meta, self.device, self.method, self.meter = loop, meta, device, method, meter
        self.batched: Batching = batching if batching in ("stacked", "vmap") else "auto"  # chunks of > 1 task
        self.timer = timer
        self.limit = limit
        self.tasks = unstack_tasks(tasks) if isinstance(tasks, Task) else list(tasks)
        self.stacked_tasks = tasks if isinstance(tasks, Task) else None  # as drawn: its layout (strides) kept
        self.steps = self.tasks[0].inner_steps
        self._cache: dict[tuple[str, int, int, int], int] = {}
        self._call_seconds: dict[tuple[str, int, int, int], float] = {}  # the measured calls, timed
        self._probes: dict[tuple[str, int, int], dict[int, tuple[str, int, int, int]]] = {}  # steps -> measured call
        self._warm: set[tuple[str, int, int]] = set()
        self._seconds: dict[tuple[str, int], float] = {}
        self._compiled_seconds: dict[tuple[str, int], float] = {}  # measured at T, apart from extrapolations

    def _batch(self, estimator: AbstractEstimator, steps: int, n_tasks: int,
               chunk: int) -> tuple[Task | list[Task], Literal["stacked", "vmap", "loop"]]:
        """The tasks cut to `steps` steps, and how a chunk of `chunk` runs them (what the plan will run)."""
        cut = [t._replace(support=t.support[:steps]) for t in self.tasks[:n_tasks]]
        if chunk > 1 and n_tasks > 1:
            mode, stacked = resolve_for(estimator, self.loop, self.meta, cut, self.batched)
            if mode != "loop":
                return stacked, mode
        return cut, "loop"

    def measure(self, estimator: AbstractEstimator, steps: int, n_tasks: int, chunk: int = 1) -> int:
        """Peak bytes of one call of `estimator` on `n_tasks` tasks cut to `steps` inner steps, in vmapped
        chunks of `chunk` tasks (1: task by task). A compiled estimator is measured eagerly (compiling at
        every probe's shape would cost more than the run; the compiled graph keeps no more than eager's)."""
        estimator = getattr(estimator, "eager", estimator)
        chunk = max(1, min(chunk, n_tasks))
        key = self._key(estimator, steps, n_tasks, chunk)
        if key in self._cache:
            return self._cache[key]
        batch, batching = self._batch(estimator, steps, n_tasks, chunk)
        if self.meter is not None:
            first, _ = self._batch(estimator, steps, chunk, chunk)  # the first chunk: the largest graph of the call
            self._cache[key] = self.meter(estimator, first, batching)
            return self._cache[key]
        self._warm_up(estimator, n_tasks, chunk)
        with measure_peak_memory(self.device, self.method) as memory:
            self._call_seconds[key] = self._timed_call(estimator, batch, batching, chunk)
        self._cache[key] = memory.peak_bytes
        return self._cache[key]

    @staticmethod
    def _key(estimator: AbstractEstimator, steps: int, n_tasks: int, chunk: int) -> tuple[str, int, int, int]:
        """The cache key of a measured call: (estimator, steps, tasks, chunk size)."""
        estimator = getattr(estimator, "eager", estimator)
        return describe(estimator), steps, n_tasks, max(1, min(chunk, n_tasks))

    def _configuration(self, estimator: AbstractEstimator, n_tasks: int, chunk: int) -> tuple[str, int, int]:
        """A call's key less its steps: the probes of one prediction."""
        name, _, n_tasks, chunk = self._key(estimator, 0, n_tasks, chunk)
        return name, n_tasks, chunk

    @property
    def can_time(self) -> bool:
        """Whether `seconds` means anything: real calls, or a `timer` standing in for them."""
        return self.meter is None or self.timer is not None

    def seconds(self, estimator: AbstractEstimator, n_tasks: int, chunks: Sequence[int], rounds: int = 2,
                steps: int | None = None, typical: bool = False) -> tuple[list[float], int]:
        """Wall-clock seconds of one call of `estimator` on `n_tasks` tasks cut to `steps` inner steps (default
        `min(T, TIMED_STEPS)`), for each vmapped chunk size in `chunks` (1: task by task), and those steps.

        Each configuration is warmed up once, then the configurations alternate for `rounds` rounds and each
        keeps its fastest call (the load on a shared machine drifts; a minimum is the least disturbed call, the
        right figure for comparing batchings) or, with `typical`, its median call (what a time budget's guard
        sees: on this 2-core machine a call's median ran 5-15% above its minimum). Approximate: a ratio between
        batchings, not a prediction of the seconds at T (`predict_seconds` is). A compiled estimator is timed
        eagerly, as it is measured."""
        return self.seconds_of([(estimator, chunk) for chunk in chunks], n_tasks, rounds, steps, typical)

    def seconds_of(self, configurations: Sequence[tuple[AbstractEstimator, int]], n_tasks: int, rounds: int = 2,
                   steps: int | None = None, typical: bool = False) -> tuple[list[float], int]:
        """`seconds` for (estimator, chunk size) pairs, which may differ in the estimator too (the planner compares
        an estimator's repetitions per pass this way), timed alternately."""
        steps = min(self.steps, TIMED_STEPS if steps is None else steps)
        configs = []
        for estimator, c in configurations:
            estimator = getattr(estimator, "eager", estimator)
            configs.append((estimator, max(1, min(c, n_tasks)), *self._batch(estimator, steps, n_tasks, c)))
        if self.timer is not None:
            return [self.timer(estimator, batch, batching) for estimator, _, batch, batching in configs], steps
        for estimator, chunk, _, _ in configs:
            self._warm_up(estimator, n_tasks, chunk)
        calls: list[list[float]] = [[] for _ in configs]
        for _ in range(rounds):
            for i, (estimator, chunk, batch, batching) in enumerate(configs):
                calls[i].append(self._timed_call(estimator, batch, batching, chunk))
        return [statistics.median(c) if typical else min(c) for c in calls], steps

    def predict_seconds(self, target: AbstractEstimator, chunk: int = 1) -> float:
        """Predicted wall-clock seconds of one chunk of `chunk` tasks (1: one task alone) at the tasks' T: what a
        time budget bounds (`Budget.time`: per task, or per stacked or vmapped chunk, which shares one clock).
        The chunk is timed at a few inner steps (`seconds`: the median of three calls) and extrapolated
        with the estimator's own law (`AbstractEstimator.predict_seconds`): approximate, as wall-clock time is
        on a loaded machine; cached per configuration."""
        key = (describe(target), chunk)
        if key not in self._seconds:
            def time_at(steps: int) -> float:
                (seconds,), _ = self.seconds(target, chunk, (chunk,), rounds=3, steps=steps, typical=True)
                return seconds
            self._seconds[key] = target.predict_seconds(time_at, self.steps)
        return self._seconds[key]

    def compiled_seconds(self, target: AbstractEstimator, chunk: int = 1) -> float | None:
        """Wall-clock seconds of one chunk of `chunk` tasks at the tasks' own T through a compiled estimator
        (`metaopt.compiled.Compiled`): the median of three calls after a first one, which traces, compiles and checks
        the chunk's shape. That first call is the compilation training's first step would pay: the wrapper keeps the
        compiled function for the same shapes. Compiled code is specialized to T, so nothing is extrapolated (probes
        at other T would each compile). None where the chunk cannot compile (task by task) or the wrapper fell back
        to eager (its `fallback_reason` says why); cached per configuration."""
        key = (describe(target), chunk)
        if key not in self._compiled_seconds:
            part: Task | list[Task] = self.tasks[:max(1, chunk)]
            if self.stacked_tasks is not None:  # sliced as the runner slices a chunk: the strides training's calls have
                compressed, pattern = compress_support(self.stacked_tasks)
                part = expand_support(tree_map_only(Tensor, lambda v: v[:max(1, chunk)], compressed), pattern)
            mode, batch = resolve_for(target, self.loop, self.meta, part, self.batched)
            if mode == "loop":
                return None
            if self.timer is not None:
                self._compiled_seconds[key] = self.timer(target, batch, mode)
                return self._compiled_seconds[key]
            target(self.loop, self.meta, batch, batching=mode, chunk_size=chunk)  # traces, compiles, checks
            if not getattr(target, "compiled", False):
                return None
            self._compiled_seconds[key] = statistics.median(self._timed_call(target, batch, mode, chunk)
                                                            for _ in range(3))
        return self._compiled_seconds[key]

    def _warm_up(self, estimator: AbstractEstimator, n_tasks: int, chunk: int) -> None:
        """Run a configuration once at 2 inner steps, the first time only: first calls pay one-off costs (kernels,
        vmap and forward-AD setup) that neither a measurement nor a timing should see."""
        key = (describe(estimator), n_tasks, chunk)
        if key not in self._warm:
            warm, batching = self._batch(estimator, min(self.steps, 2), n_tasks, chunk)
            estimator(self.loop, self.meta, warm, batching=batching, chunk_size=chunk)
            self._warm.add(key)

    def _timed_call(self, estimator: AbstractEstimator, batch: Task | list[Task], batching: Batching,
                    chunk: int) -> float:
        """Seconds of one call of `estimator` on `batch` (`seconds_of`)."""
        return seconds_of(lambda: estimator(self.loop, self.meta, batch, batching=batching, chunk_size=chunk),
                          self.device)

    def predict(self, target: AbstractEstimator, n_tasks: int = 1, chunk: int = 1, at: int | None = None) -> int:
        """Predicted peak bytes of `target` at T = `at` (default: the tasks') on `n_tasks` tasks in vmapped
        chunks of `chunk` (1: task by task)."""
        probes = self._probes.setdefault(self._configuration(target, n_tasks, chunk), {})

        def measure(steps: int, estimator: AbstractEstimator | None = None) -> int:
            measured = estimator if estimator is not None else target
            probes[min(steps, self.steps)] = self._key(measured, steps, n_tasks, chunk)
            return self.measure(measured, steps, n_tasks, chunk)
        steps = self.steps if at is None else at
        coarse = target.predict_peak_bytes(measure, steps)
        if steps < REFINE_FROM or coarse > 2 * self.limit:
            return coarse
        # Probes near T: the error of a slope measured over 16..64 steps grows 3x by T=200.
        return target.predict_peak_bytes(measure, steps, probes=(steps // 4, steps // 2))

    def probed_seconds(self, target: AbstractEstimator, n_tasks: int, chunk: int = 1) -> float | None:
        """Approximate wall-clock seconds of one call of `target` at the tasks' T on `n_tasks` tasks in chunks of
        `chunk`, from the calls that predicted its memory (`predict`, called first): each was timed once as it ran
        (just after the heap was trimmed, so page faults included) and the line through the two longest is
        extrapolated to T (time is linear in T for every estimator here). Free, and rougher than `predict_seconds`
        (one call per probe, not a median): a relative figure, calibrated by what its user measures. None where
        no call was timed (a stand-in `meter`) or `predict` was not called for this configuration."""
        probes = self._probes.get(self._configuration(target, n_tasks, chunk), {})
        timed = {steps: self._call_seconds[key] for steps, key in probes.items() if key in self._call_seconds}
        if not timed:
            return None
        if self.steps in timed:
            return timed[self.steps]
        longest = sorted(timed)[-2:]
        if len(longest) == 1:
            return timed[longest[0]] * self.steps / longest[0]
        return linear_seconds(timed.__getitem__, self.steps, *longest)
