"""Full backpropagation through the whole unrolled inner loop."""
from __future__ import annotations

from metaopt.estimators.base import AbstractEstimator, TaskObjective, register
from metaopt.guard import StepGuard
from metaopt.loop import InnerLoop, task_outer_loss
from metaopt.types import MetaParams, Task

__all__ = ["Full"]


@register("full")
class Full(AbstractEstimator):
    """Exact meta-gradient: reverse mode through all T inner steps, second order included.

    d outer_loss(step^T(init(meta))) / d meta, with each inner gradient kept in the
    graph (MAML's second-order terms). Memory O(T) (every step's activations and
    inner-gradient graph are kept), time O(T) (about 3x a forward unroll). Exact.
    Serves every slot. The reference that every other estimator is tested against.
    """

    exact = True
    compiles = True  # tests/test_compiled.py: equals eager across the kinds
    stacks = True  # tests/test_stacked.py: equals vmap across the kinds

    @classmethod
    def auto_candidates(cls, loop: InnerLoop, meta: MetaParams, steps: int) -> list[AbstractEstimator]:
        return [cls()]

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        loss = task_outer_loss(loop, meta, task, create_graph=True, on_step=guard)
        return TaskObjective(loss, loss)
