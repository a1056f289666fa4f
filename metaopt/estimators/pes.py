"""Persistent evolution strategies over truncated windows of the unroll (Vicol et al. 2021)."""
from __future__ import annotations

import torch

from metaopt.estimators.base import (
    AbstractEstimator,
    TaskObjective,
    call_with_meta,
    linear_surrogate,
    meta_values,
    register,
)
from metaopt.guard import StepGuard, shifted
from metaopt.loop import InnerLoop, task_outer_loss, unroll
from metaopt.types import InnerState, MetaParams, Params, Task

__all__ = ["PersistentES"]


def check_population(name: str, population: int, sigma: float) -> None:
    """Raise ValueError unless population is an even number >= 2 (antithetic pairs) and sigma > 0."""
    if population < 2 or population % 2:
        raise ValueError(f"{name}: population must be an even number >= 2, got {population}")
    if sigma <= 0:
        raise ValueError(f"{name}: need sigma > 0 and k >= 1, got sigma={sigma}")


@register("pes")
class PersistentES(AbstractEstimator):
    """PES: ES whose perturbation is redrawn every `k` inner steps and accumulated per particle.

    The unroll is cut into windows of k steps. Each antithetic particle pair runs
    its own inner trajectory; in window j it uses meta +- sigma e_j with a fresh
    e_j, and accumulates xi = sum_j e_j. The estimate
    (1 / (2 sigma n)) sum_pairs [L+ - L-] xi is unbiased for the gradient of the
    smoothed loss of the whole unroll (Vicol et al. 2021, Algorithm 2), where
    truncated ES (`persistent=False`: only the last window perturbed, earlier
    windows at meta) is biased: it cannot see how meta acts before the last
    window (e.g. an initialization gets zero gradient).

    Memory O(1) in T, time O(population T). Serves every slot. This form runs all
    windows of one task inside one call; the online form (meta updated between
    windows of one long unroll carried across meta-steps) is `OnlinePES`.

    Args:
      population: particles per task (even: population/2 antithetic pairs).
      sigma: perturbation scale.
      k: inner steps per window (truncation length); None: one window, which is plain
        antithetic ES (`es`).
      persistent: accumulate perturbations across windows (PES) or not (truncated ES).
      seed: the perturbations' random stream (`noise_like`).
    """

    exact = False
    second_order = False
    stochastic = True

    def __init__(self, population: int = 16, sigma: float = 0.01, k: int | None = 5, persistent: bool = True,
                 seed: int = 0):
        check_population(self.name, population, sigma)
        if k is not None and k < 1:
            raise ValueError(f"{self.name}: need sigma > 0 and k >= 1, got sigma={sigma}, k={k}")
        self.population, self.sigma, self.k, self.persistent, self.seed = population, sigma, k, persistent, seed

    def _window(self, task: Task) -> int:
        return self.k if self.k is not None else max(1, task.inner_steps)

    def _particle_loss(self, loop: InnerLoop, meta: MetaParams, task: Task, windows: list[Params],
                       guard: StepGuard | None) -> torch.Tensor:
        state: InnerState | None = None
        size = self._window(task)
        for j, vals in enumerate(windows):
            batches = task.support[j * size:(j + 1) * size]
            if state is None:  # the initialization belongs to the first window
                state = call_with_meta(meta, vals, lambda m: loop.init(m, task.init))
            hook = shifted(guard, j * size)
            state = call_with_meta(meta, vals, lambda m, s: unroll(loop, s, batches, m, create_graph=False,
                                                                   on_step=hook), state)
        return call_with_meta(meta, windows[-1], lambda m, s: loop.outer_loss(s, task.query, m), state)

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        values = meta_values(meta)
        n_windows = max(1, -(-task.inner_steps // self._window(task)))
        pairs = self.population // 2
        with torch.no_grad():
            grads = {k: torch.zeros_like(v) for k, v in values.items()}
            for _ in range(pairs):
                plus, minus = [], []
                xi = {k: torch.zeros_like(v) for k, v in values.items()}
                for j in range(n_windows):
                    if self.persistent or j == n_windows - 1:
                        noise = {k: self.noise_like(v) for k, v in values.items()}
                        xi = {k: xi[k] + noise[k] for k in xi}
                    else:
                        noise = {k: torch.zeros_like(v) for k, v in values.items()}
                    plus.append({k: v + self.sigma * noise[k] for k, v in values.items()})
                    minus.append({k: v - self.sigma * noise[k] for k, v in values.items()})
                scale = (self._particle_loss(loop, meta, task, plus, guard) -
                         self._particle_loss(loop, meta, task, minus, guard)) / (2 * self.sigma * pairs)
                grads = {k: grads[k] + scale * xi[k] for k in grads}
            loss = task_outer_loss(loop, meta, task, create_graph=False, on_step=guard)
        return TaskObjective(linear_surrogate(meta, grads), loss)
