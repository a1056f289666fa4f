"""Sinusoid regression (Finn et al. 2017, section 5.1)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from metaopt import losses
from metaopt.tasks.base import TaskDistribution
from metaopt.tasks.ranking import smallest_indices
from metaopt.types import Batch, LossFn, Task

__all__ = ["Sinusoid"]


def _pair(bounds: Sequence[float]) -> tuple[float, float]:
    low, high = bounds
    return float(low), float(high)


class Sinusoid(TaskDistribution):
    """y = A sin(x - phase) with A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5].

    Each task has `k_shot` support and `k_query` query points, drawn independently
    (Finn et al. 2017), or, with `points_per_task`, drawn without replacement from a
    fixed pool of that many points per task (support and query then never overlap).
    For MAML the one support batch is used at every inner step.

    Args:
      k_shot: support points per task (K).
      k_query: query points per task (default: K, as Finn et al.).
      amplitude: (low, high) of the uniform amplitude.
      phase: (low, high) of the uniform phase, radians.
      x_range: (low, high) of the uniform inputs.
      points_per_task: size of a finite pool of points per task, or None for fresh draws.

    Raises:
      ValueError: K or Q below 1, or K + Q larger than `points_per_task`.
    """

    kind = "regression"

    def __init__(self, k_shot: int = 10, k_query: int | None = None,
                 amplitude: Sequence[float] = (0.1, 5.0), phase: Sequence[float] = (0.0, math.pi),
                 x_range: Sequence[float] = (-5.0, 5.0), points_per_task: int | None = None):
        k_query = k_shot if k_query is None else k_query
        if k_shot < 1 or k_query < 1:
            raise ValueError(f"sinusoid: k_shot and k_query must be >= 1, got {k_shot} and {k_query}")
        if points_per_task is not None and k_shot + k_query > points_per_task:
            raise ValueError(f"sinusoid: k_shot + k_query = {k_shot} + {k_query} = {k_shot + k_query} "
                             f"points are needed per task but points_per_task = {points_per_task}; "
                             "lower k_shot/k_query or raise points_per_task")
        self.k_shot, self.k_query = k_shot, k_query
        self.amplitude, self.phase, self.x_range = _pair(amplitude), _pair(phase), _pair(x_range)
        self.points_per_task = points_per_task

    def __repr__(self) -> str:
        return f"Sinusoid(k_shot={self.k_shot}, k_query={self.k_query})"

    @property
    def loss_fn(self) -> LossFn:
        return losses.mse

    def _uniform(self, shape: tuple[int, ...], bounds: tuple[float, float], g: torch.Generator) -> torch.Tensor:
        low, high = bounds
        return torch.rand(shape, generator=g, dtype=torch.get_default_dtype()) * (high - low) + low

    def sample(self, n_tasks: int, inner_steps: int, generator: torch.Generator) -> Task:
        amplitude = self._uniform((n_tasks, 1, 1), self.amplitude, generator)
        phase = self._uniform((n_tasks, 1, 1), self.phase, generator)
        n = self.k_shot + self.k_query
        if self.points_per_task is None:
            x = self._uniform((n_tasks, n, 1), self.x_range, generator)
        else:
            pool = self._uniform((n_tasks, self.points_per_task, 1), self.x_range, generator)
            pick = smallest_indices(torch.rand((n_tasks, self.points_per_task), generator=generator), n)
            x = pool.gather(1, pick.unsqueeze(-1))
        y = amplitude * torch.sin(x - phase)
        support = Batch(x[:, :self.k_shot], y[:, :self.k_shot])
        query = Batch(x[:, self.k_shot:], y[:, self.k_shot:])
        return Task.repeat(support, query, inner_steps)
