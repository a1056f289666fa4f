"""Task distributions: where meta-training and meta-testing tasks come from."""
from __future__ import annotations

import abc
from typing import ClassVar, Literal

import torch

from metaopt.types import LossFn, Task

__all__ = ["TaskDistribution"]


class TaskDistribution(abc.ABC):
    """A distribution over inner problems.

    Class attributes:
      kind: "regression" (evaluated by loss) or "classification" (also by accuracy).
    """

    kind: ClassVar[Literal["regression", "classification"]]

    @property
    @abc.abstractmethod
    def loss_fn(self) -> LossFn:
        """The loss of this family of tasks (inner and outer)."""

    @abc.abstractmethod
    def sample(self, n_tasks: int, inner_steps: int, generator: torch.Generator) -> Task:
        """A batch of `n_tasks` tasks with a leading task axis, `inner_steps` support batches each.

        Tensors are created in `torch.get_default_dtype()` on the CPU; the same
        generator state always gives the same tasks.
        """
