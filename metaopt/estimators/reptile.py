"""Reptile: move the initialization towards the adapted parameters."""
from __future__ import annotations

import torch

from metaopt.estimators.base import AbstractEstimator, EstimatorUnsupported, TaskObjective, register
from metaopt.guard import StepGuard
from metaopt.linalg import entry_sum
from metaopt.loop import InnerLoop, unroll
from metaopt.types import MetaParams, Task

__all__ = ["Reptile"]


@register("reptile")
class Reptile(AbstractEstimator):
    """Reptile's update direction as a meta-gradient: params_0 - params_T (Nichol et al. 2018).

    With an outer SGD of rate epsilon this is Reptile's theta <- theta + epsilon
    (phi_T - theta). Uses only the support batches; the query loss is reported, not
    differentiated. Memory O(1) graphs, time O(T); runs under vmap and stacked. Not a gradient of the outer
    loss (approximates it to first order for small inner rates). Serves only the
    "init" slot.
    """

    exact = False
    second_order = False
    stacks = True  # tests/test_stacked.py: equals vmap

    def check(self, loop: InnerLoop, meta: MetaParams) -> None:
        super().check(loop, meta)
        if "init" not in meta or set(meta.keys()) != {"init"}:
            raise EstimatorUnsupported(
                f"reptile meta-learns only an initialization (slot 'init'), but meta has slots "
                f"{sorted(meta.keys())}; use first_order or full for other meta-parameters")
        if loop.adapt is not None:
            raise EstimatorUnsupported(
                f"reptile moves the initialization towards the adapted parameters, but the loop adapts only "
                f"{list(loop.adapt)} (adapt): the held ones would never move; use first_order or full")

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        start = loop.init(meta, task.init).params
        with torch.no_grad():
            state = unroll(loop, loop.init(meta, task.init), task.support, meta, create_graph=False, on_step=guard)
            loss = loop.outer_loss(state, task.query, meta)
        # Summed per task: [B] on a StackedLoop (the loss's shape), a scalar for one task.
        surrogate = entry_sum({k: p * (p - state.params[k]).detach() for k, p in start.items()}, batched=loss.dim() > 0)
        return TaskObjective(surrogate, loss)
