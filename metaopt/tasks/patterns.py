"""Synthetic few-shot image classification: N random smooth patterns, noisy shifted copies.

Needs no data on disk, so image models (conv4) can be tested and benchmarked
anywhere. Not a benchmark of learning quality: use Omniglot for that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from metaopt import losses
from metaopt.tasks.base import TaskDistribution
from metaopt.types import Batch, LossFn, Task

__all__ = ["RandomPatterns"]


class RandomPatterns(TaskDistribution):
    """N-way K-shot classification of random images [1, size, size].

    Each class is a random low-frequency pattern (Gaussian noise upsampled from
    size/4); its examples are that pattern rolled by up to `max_shift` pixels plus
    Gaussian noise of std `noise`. Labels are 0..N-1; one random roll per batch.

    Args:
      n_way, k_shot, k_query: classes per task, support and query examples per class.
      size: image height = width.
      noise: pixel noise std.
      max_shift: largest roll in pixels.
    """

    kind = "classification"

    def __init__(self, n_way: int = 5, k_shot: int = 1, k_query: int = 5, size: int = 28, noise: float = 0.3,
                 max_shift: int = 2):
        if n_way < 2 or k_shot < 1 or k_query < 1:
            raise ValueError(f"patterns: need n_way >= 2, k_shot >= 1, k_query >= 1; got {n_way}, {k_shot}, {k_query}")
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.size, self.noise, self.max_shift = size, noise, max_shift

    def __repr__(self) -> str:
        return f"RandomPatterns({self.n_way}-way {self.k_shot}-shot, {self.size}x{self.size})"

    @property
    def loss_fn(self) -> LossFn:
        return losses.cross_entropy

    def _examples(self, patterns: torch.Tensor, per_class: int, g: torch.Generator) -> Batch:
        b, n = patterns.shape[:2]
        x = patterns.unsqueeze(2).expand(b, n, per_class, self.size, self.size)
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=shifts, dims=(-2, -1))
        x = x + self.noise * torch.randn(x.shape, generator=g, dtype=x.dtype)
        y = torch.arange(n).repeat_interleave(per_class).expand(b, -1)
        return Batch(x.reshape(b, n * per_class, 1, self.size, self.size), y)

    def sample(self, n_tasks: int, inner_steps: int, generator: torch.Generator) -> Task:
        low = max(self.size // 4, 1)
        coarse = torch.randn((n_tasks * self.n_way, 1, low, low), generator=generator, dtype=torch.get_default_dtype())
        patterns = F.interpolate(coarse, size=(self.size, self.size), mode="bilinear", align_corners=False)
        patterns = patterns.view(n_tasks, self.n_way, self.size, self.size)
        support = self._examples(patterns, self.k_shot, generator)
        query = self._examples(patterns, self.k_query, generator)
        return Task.repeat(support, query, inner_steps)
