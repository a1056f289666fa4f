"""`auto`: pick the estimator that fits the budget."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from metaopt.batching import Batching
from metaopt.budget import Budget
from metaopt.estimators.base import AbstractEstimator, MetaGrad, TaskObjective, register
from metaopt.guard import StepGuard
from metaopt.loop import InnerLoop
from metaopt.types import MetaParams, Task

if TYPE_CHECKING:
    from metaopt.planning import Meter, Plan

__all__ = ["Auto"]


@register("auto")
class Auto(AbstractEstimator):
    """The cheapest exact estimator that fits the memory budget, else the least-biased approximation.

    At the first call for a given number of tasks and inner steps it predicts
    memory (`metaopt.planning.choose`): full if it fits; else checkpoint with the
    segment size of smallest predicted memory; else implicit or exact forward mode
    where they serve the meta-parameters; else truncated with the largest k that
    fits; else first_order. The choice, its vmap chunking and the reason are kept
    in `plan` and reported in every result's stats ("estimator_chosen",
    "choice_reason", "predicted_peak_bytes"). Without a memory budget: full.
    """

    exact = True

    def __init__(self) -> None:
        self._plans: dict[tuple[int, int, Budget], Plan] = {}
        self.plan: Plan | None = None

    def choose(self, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task], budget: Budget,
               batching: Batching = "auto", device: torch.device | str = "cpu", meter: Meter | None = None) -> Plan:
        """The `metaopt.planning.Plan` for these tasks (cached by task count and inner steps)."""
        from metaopt.planning import choose  # planning imports this package

        n = tasks.query.x.shape[0] if isinstance(tasks, Task) else len(tasks)
        steps = tasks.inner_steps if isinstance(tasks, Task) else tasks[0].inner_steps
        key = (n, steps, budget)
        if key not in self._plans:
            self._plans[key] = choose(loop, meta, tasks, budget, batching=batching, device=device, meter=meter)
        self.plan = self._plans[key]
        return self.plan

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        raise NotImplementedError("auto delegates whole calls to the estimator it chooses")

    def __call__(self, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                 budget: Budget | None = None, *, batching: Batching = "auto", chunk_size: int | None = None,
                 clock: Callable[[], float] | None = None,
                 memory_probe: Callable[[], int] | None = None) -> MetaGrad:
        budget = budget if budget is not None else Budget()
        plan = self.choose(loop, meta, tasks, budget, batching)
        result = plan.estimator(loop, meta, tasks, budget, batching=plan.batching, chunk_size=plan.chunk_size,
                                clock=clock, memory_probe=memory_probe)
        result.stats.update({"estimator_chosen": plan.estimator.name, "choice_reason": plan.reason,
                             "predicted_peak_bytes": plan.predicted_peak_bytes})
        return result

    def __repr__(self) -> str:
        return "Auto()"
