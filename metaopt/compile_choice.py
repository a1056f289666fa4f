"""Whether to compile: `compile: auto` compiles where the run is long enough to pay and compiled is measured faster.

A compiled meta-gradient (`metaopt.compiled.Compiled`) is 3-5x faster than eager on the sinusoid's CPU step, but
its first call at a shape traces, compiles and checks for seconds (4-15 s on the CPU, more with a cold Inductor
cache), and it is not faster everywhere (a conv4 on a GPU ran slower under Inductor than cuDNN's kernels: README).
So the choice is measured, like the planner's other choices, and only where it can matter:

- the eager plan is made first (`metaopt.planning.plan`: batching and chunks timed); its memory probes' calls give
  the run's eager meta-gradient seconds for free (`Plan.predicted_call_seconds` x meta-steps);
- under `COMPILE_PAYS_AFTER` seconds of them, the run stays eager without compiling: a compilation would cost
  more than it could save;
- else the compiled plan is made (by memory: compiled code has its own batching, vmapped chunks) and its chunk is
  compiled at the tasks' T and timed (`Predictor.compiled_seconds`: the compilation training's first step would
  pay, kept), against the eager plan's call timed at T the same way (median of three); compiled runs where it is
  `COMPILED_FASTER` x faster, eager otherwise (or where compilation fell back: its reason is kept).
"""
from __future__ import annotations

import math
from typing import Sequence, cast

import torch

from metaopt.budget import Budget
from metaopt.compiled import Compiled
from metaopt.estimators.base import AbstractEstimator
from metaopt.loop import InnerLoop
from metaopt.planning import Plan, plan
from metaopt.prediction import Meter, Predictor, Timer
from metaopt.batching import Batching
from metaopt.types import MetaParams, Task

__all__ = ["choose_compiled", "COMPILE_PAYS_AFTER", "COMPILED_FASTER"]

COMPILE_PAYS_AFTER = 60.0
"""Seconds of eager meta-gradients (predicted, over the run) below which `compile: auto` does not compile: the
compilations measured on this 2-core CPU took 4-15 s, and a run must save several times that to be worth one."""
COMPILED_FASTER = 1.2
"""Compiled runs only where its timed call is this many times faster than eager's (a margin over timing noise)."""


def choose_compiled(compiled: Compiled, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                    budget: Budget, *, meta_steps: int, batching: Batching = "auto", device: torch.device | str = "cpu",
                    fixed_bytes: int = 0, meter: Meter | None = None, timer: Timer | None = None) -> Plan:
    """The plan of `compiled`'s estimator, eager (`compiled.eager`) or compiled (`compiled`), chosen as the module
    docstring says; its reason ends with the choice and its figures. `meta_steps`: the meta-steps the run will
    take (a resumed run's remaining ones). `meter`, `timer`: stand-ins, as for `plan`."""
    common = dict(batching=batching, device=device, fixed_bytes=fixed_bytes, meter=meter, timer=timer)
    eager = plan(compiled.eager, loop, meta, tasks, budget, **common)  # type: ignore[arg-type]
    run = None if eager.predicted_call_seconds is None else meta_steps * eager.predicted_call_seconds
    if run is None or run < COMPILE_PAYS_AFTER:
        figure = "not timed" if run is None else f"~{run:.3g} s"
        return _chose(eager, f"eager: the run's meta-gradients are predicted {figure} eager, under the "
                             f"{COMPILE_PAYS_AFTER:.0f} s after which compiling may pay (compile: auto)")
    found = plan(compiled, loop, meta, tasks, budget, **common)  # type: ignore[arg-type]
    predictor = Predictor(loop, meta, tasks, device, timer=timer, batching=found.batching)
    n = len(predictor.tasks)
    chunk_seconds = predictor.compiled_seconds(cast(AbstractEstimator, compiled), found.chunk_size)
    if chunk_seconds is None:
        why = compiled.fallback_reason or "the plan runs one task at a time, which does not compile"
        return _chose(eager, f"eager: compiling fell back ({why})")
    compiled_s = chunk_seconds * math.ceil(n / found.chunk_size)
    timing = Predictor(loop, meta, tasks, device, timer=timer, batching=eager.batching)
    (eager_s,), steps = timing.seconds(compiled.eager, n, (eager.chunk_size,), rounds=3, steps=timing.steps,
                                       typical=True)
    figures = (f"a meta-gradient measured {compiled_s:.3g} s compiled ({found.batching}, chunks of "
               f"{found.chunk_size}, compiling took {compiled.compile_seconds:.3g} s) vs {eager_s:.3g} s eager "
               f"({eager.batching}) at T={steps}")
    if compiled_s * COMPILED_FASTER <= eager_s:
        return _chose(found._replace(predicted_call_seconds=compiled_s), f"compiled: {figures}")
    return _chose(eager, f"eager: compiled is not {COMPILED_FASTER}x faster ({figures})")


def _chose(found: Plan, why: str) -> Plan:
    return found._replace(reason=f"{found.reason}; {why}")
