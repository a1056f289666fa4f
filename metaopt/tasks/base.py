"""Task distributions: where meta-training and meta-testing tasks come from."""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Literal

import torch

from metaopt.types import LossFn, Task

__all__ = ["TaskDistribution", "EmptySplit"]


class EmptySplit(ValueError):
    """The data holds nothing for the split asked for (e.g. a test split of alphabets that are not there):
    a caller may skip what needed it (the app then records why) rather than fail."""


class TaskDistribution(abc.ABC):
    """A distribution over inner problems.

    Class attributes:
      kind: "regression" (evaluated by loss) or "classification" (also by accuracy).
    """

    kind: ClassVar[Literal["regression", "classification"]]
    windowed: ClassVar[bool] = False
    """Whether `next_batch` gives windows of longer unrolls, which only an online estimator can continue."""
    query_views: int = 1
    """Views of every query image the query batch holds, view by view (`metaopt.tasks.augment.with_views`):
    evaluation averages a query's predictions over its views (`pooled_views`); a meta-gradient takes every view
    as a query of its own. 1: the queries alone."""

    @property
    @abc.abstractmethod
    def loss_fn(self) -> LossFn:
        """The loss of this family of tasks (inner and outer)."""

    @abc.abstractmethod
    def sample(self, n_tasks: int, inner_steps: int, generator: torch.Generator) -> Task:
        """A batch of `n_tasks` tasks with a leading task axis, `inner_steps` support batches each.

        Tensors are created in `torch.get_default_dtype()` on the CPU (or where `to` put the
        distribution's data); the same generator state always gives the same tasks.
        """

    def to(self, device: torch.device | str) -> "TaskDistribution":
        """This distribution sampling on `device` where it can: a copy whose data lives there, so tasks are
        gathered on the device instead of built on the host and copied (the generator stays on the CPU: the
        same tasks on every device). Default: itself (its tasks are built on the CPU; the caller moves them)."""
        return self

    def next_batch(self, n_tasks: int, inner_steps: int, generator: torch.Generator, source_state: Any = None,
                   carry: Any = None) -> tuple[Task, Any]:
        """The tasks of training's next meta-step, and this source's state after drawing them.

        Args:
          source_state: what the previous call returned (None at the start; checkpointed by `TrainState`).
          carry: the estimator's `MetaGrad.carry` from the previous meta-step (online estimators).

        Default: `sample` (fresh tasks every meta-step, nothing carried). `metaopt.online.OnlineTasks`
        returns windows of long unrolls instead, with the carry attached.
        """
        return self.sample(n_tasks, inner_steps, generator), None
