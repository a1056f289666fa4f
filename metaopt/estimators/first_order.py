"""First-order MAML (FOMAML): drop the second-order terms of the unroll."""
from __future__ import annotations

from metaopt.estimators.base import AbstractEstimator, TaskObjective, register
from metaopt.guard import StepGuard
from metaopt.loop import InnerLoop, task_outer_loss
from metaopt.types import MetaParams, Task

__all__ = ["FirstOrder"]


@register("first_order")
class FirstOrder(AbstractEstimator):
    """First-order approximation (FOMAML, Finn et al. 2017, section 5.2).

    Every inner gradient is treated as a constant: d params_{t+1} / d params_t = I,
    so the initialization gets the outer gradient at the adapted parameters, and a
    learning rate gets -sum_t <grad_t, d outer / d params_T> (exact for T = 1).
    Memory: one forward unroll's parameters, no inner-gradient graphs; time O(T).
    Biased (drops all Hessian terms). Serves every slot, but meta-parameters that
    reach the inner loop only through the inner gradient (a learned loss, data
    transforms) get zero meta-gradient.
    """

    exact = False
    compiles = True  # tests/test_compiled.py: equals eager across the kinds
    stacks = True  # tests/test_stacked.py: equals vmap across the kinds

    @classmethod
    def auto_candidates(cls, loop: InnerLoop, meta: MetaParams, steps: int) -> list[AbstractEstimator]:
        return [cls()]
    second_order = False

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        loss = task_outer_loss(loop, meta, task, create_graph=False, on_step=guard)
        return TaskObjective(loss, loss)
