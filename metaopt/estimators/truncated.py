"""Truncated backpropagation through the last `k` inner steps."""
from __future__ import annotations

import torch

from metaopt.estimators.base import AbstractEstimator, TaskObjective, linear_prediction, linear_seconds, register
from metaopt.guard import StepGuard, shifted
from metaopt.loop import InnerLoop, detach_state, unroll
from metaopt.types import MetaParams, Task

__all__ = ["Truncated"]


@register("truncated")
class Truncated(AbstractEstimator):
    """Backprop through the last `k` of T inner steps; the state before them is detached.

    Memory O(k) in T (the first T-k steps run without any graph), time O(T).
    Biased for k < T; equals `full` exactly when k >= T. Meta-parameters used only
    before step T-k (e.g. the initialization, when k < T) get zero gradient.
    Williams & Peng 1990; Shaban et al. 2019 for meta-learning.

    Args:
      k: number of differentiated inner steps.
    """

    exact = False
    compiles = True  # tests/test_compiled.py: equals eager across the kinds
    stacks = True  # tests/test_stacked.py: equals vmap across the kinds

    @classmethod
    def auto_candidates(cls, loop: InnerLoop, meta: MetaParams, steps: int) -> list[AbstractEstimator]:
        """k = T/2, T/4, ..., T/64 when some meta-parameter acts after the first inner step: an
        initialization alone gets a zero gradient from any k < T."""
        if set(meta.keys()) == {"init"}:
            return []
        return [cls(k=k) for k in sorted({max(1, steps // d) for d in (2, 4, 8, 16, 64)}, reverse=True) if k < steps]

    def bias(self, steps: int) -> float:
        """The share of the unroll left out of the graph (0 when k >= T)."""
        return max(0.0, 1.0 - self.k / max(steps, 1))

    def __init__(self, k: int = 5):
        if k < 1:
            raise ValueError(f"truncated: k must be >= 1, got {k}")
        self.k = k

    def predict_peak_bytes(self, measure, steps: int, probes: tuple[int, int] = (16, 64)) -> int:
        # Up to k steps it is full backprop; past k only the graph-free prefix grows (slowly).
        if steps <= self.k:
            return super().predict_peak_bytes(measure, steps)
        return linear_prediction(measure, steps, self.k + 16, self.k + 64)

    def predict_seconds(self, time_at, steps: int) -> float:
        # The k differentiated steps cost more than the graph-free ones before them: probes past k time the slope
        # of the prefix, with all k steps in both.
        return linear_seconds(time_at, steps, self.k + 16, self.k + 64)

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        cut = max(task.inner_steps - self.k, 0)
        state = loop.init(meta, task.init)
        if cut:
            with torch.no_grad():  # no graph at all before the cut: memory O(k)
                state = unroll(loop, state, task.support[:cut], meta, create_graph=False, on_step=guard)
            state = detach_state(state)
        state = unroll(loop, state, task.support[cut:], meta, on_step=shifted(guard, cut))
        loss = loop.outer_loss(state, task.query, meta)
        return TaskObjective(loss, loss)
