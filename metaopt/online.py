"""Online (truncated) training: each task is unrolled for a long horizon, one window per meta-step.

Learned optimizers and other long-unroll meta-parameters are trained on trajectories far longer
than one meta-gradient can afford (Metz et al. 2022; Vicol et al. 2021): a pool of B tasks is
unrolled in windows of K inner steps; each meta-step advances every task by one window, and the
meta-parameters are updated between windows. An online estimator (`metaopt.estimators.OnlinePES`)
carries its particles' states from one window to the next in `Task.carry`; a task whose unroll has
reached the horizon is replaced by a fresh one. The unrolls are staggered (the first trajectory of
task b is cut short by b/B of the horizon) so that the tasks of one meta-step sit at different
points of training and their gradients are less correlated.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, NamedTuple

import torch

from metaopt.batching import stack_tasks, unstack_tasks
from metaopt.tasks.base import TaskDistribution
from metaopt.types import Carry, LossFn, Task

__all__ = ["OnlineTasks", "OnlinePool"]

logger = logging.getLogger("metaopt")


class OnlinePool(NamedTuple):
    """The online source's state between meta-steps (checkpointed with the train state).

    Attributes:
      tasks: each task's whole unroll (`horizon` support batches, no task axis).
      position: inner steps each task's unroll has done.
      length: where each task's unroll ends (the horizon, or less for the staggered first ones).
    """

    tasks: list[Task]
    position: list[int]
    length: list[int]


class OnlineTasks(TaskDistribution):
    """A task distribution unrolled online: training draws windows of `horizon`-step unrolls.

    `sample` is the wrapped distribution's (planning and evaluation use whole, independent tasks:
    evaluate at `eval_inner_steps=horizon`); `next_batch` (what `meta_train` draws from) gives the
    next window of each of the pool's tasks, `inner_steps` steps long, with `Task.carry` set to the
    estimator's carry from the previous meta-step and `Carry.fresh` marking the tasks whose unroll
    starts in this window.

    Args:
      tasks: the distribution the long unrolls are drawn from.
      horizon: inner steps of each task's whole unroll (a multiple of the window).
      stagger: cut the pool's first unrolls short so that resets are spread over meta-steps.

    Raises (from `next_batch`):
      ValueError: the window does not divide the horizon, or the batch size changed mid-run.
    """

    windowed: ClassVar[bool] = True

    def __init__(self, tasks: TaskDistribution, horizon: int, stagger: bool = True):
        if horizon < 1:
            raise ValueError(f"OnlineTasks: horizon must be >= 1, got {horizon}")
        self.tasks, self.horizon, self.stagger = tasks, horizon, stagger
        self.kind = tasks.kind  # type: ignore[misc]  # the wrapped distribution's kind

    def __repr__(self) -> str:
        return f"OnlineTasks({self.tasks!r}, horizon={self.horizon})"

    @property
    def loss_fn(self) -> LossFn:
        return self.tasks.loss_fn

    def sample(self, n_tasks: int, inner_steps: int, generator: torch.Generator) -> Task:
        return self.tasks.sample(n_tasks, inner_steps, generator)

    def _fresh_pool(self, n_tasks: int, window: int, generator: torch.Generator) -> OnlinePool:
        tasks = unstack_tasks(self.tasks.sample(n_tasks, self.horizon, generator))
        windows = self.horizon // window
        length = [self.horizon - window * (b * windows // n_tasks) if self.stagger else self.horizon
                  for b in range(n_tasks)]
        return OnlinePool(tasks, [0] * n_tasks, length)

    def next_batch(self, n_tasks: int, inner_steps: int, generator: torch.Generator, source_state: Any = None,
                   carry: Any = None) -> tuple[Task, OnlinePool]:
        window = inner_steps
        if window < 1 or self.horizon % window:
            raise ValueError(f"OnlineTasks: the window (inner_steps={window}) must divide the horizon "
                             f"({self.horizon})")
        if source_state is not None and carry is None:
            # The last meta-step carried nothing back (a task skipped under the budget, or dropped as
            # non-finite): the particles' states are gone, so every unroll restarts on fresh tasks.
            logger.warning("OnlineTasks: no carry from the last meta-step; restarting every unroll")
            source_state = None
        pool = source_state if source_state is not None else self._fresh_pool(n_tasks, window, generator)
        if len(pool.tasks) != n_tasks:
            raise ValueError(f"OnlineTasks: the pool has {len(pool.tasks)} tasks but {n_tasks} were asked for "
                             "(the meta-batch size cannot change during online training)")
        tasks, position, length = list(pool.tasks), list(pool.position), list(pool.length)
        for b in range(n_tasks):
            if position[b] >= length[b]:  # this unroll is done: a fresh task takes its place
                tasks[b] = unstack_tasks(self.tasks.sample(1, self.horizon, generator))[0]
                position[b], length[b] = 0, self.horizon
        fresh = torch.tensor([p == 0 for p in position])
        windows = [t._replace(support=t.support[p:p + window]) for t, p in zip(tasks, position)]
        batch = stack_tasks(windows)._replace(carry=Carry(fresh, carry))
        return batch, OnlinePool(tasks, [p + window for p in position], length)
