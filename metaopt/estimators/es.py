"""Antithetic evolution strategies on the meta-parameters."""
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
from metaopt.guard import StepGuard
from metaopt.loop import InnerLoop, task_outer_loss
from metaopt.types import MetaParams, Params, Task

__all__ = ["EvolutionStrategies"]


@register("es")
class EvolutionStrategies(AbstractEstimator):
    """Antithetic ES: (1 / (2 sigma n)) sum_i [L(meta + sigma e_i) - L(meta - sigma e_i)] e_i, e_i ~ N(0, I).

    Zeroth order: only forward unrolls, no inner-gradient graph, so memory is O(1)
    in T and it works through non-differentiable inner loops. Time O(population T).
    Unbiased for the gradient of the Gaussian-smoothed outer loss (equal to the
    true gradient up to O(sigma^2)); variance grows with the number of
    meta-parameters (Salimans et al. 2017). Serves every slot.

    Args:
      population: perturbations per task (even: population/2 antithetic pairs).
      sigma: perturbation scale.
    """

    exact = False
    second_order = False

    def __init__(self, population: int = 16, sigma: float = 0.01):
        if population < 2 or population % 2:
            raise ValueError(f"es: population must be an even number >= 2, got {population}")
        if sigma <= 0:
            raise ValueError(f"es: sigma must be > 0, got {sigma}")
        self.population, self.sigma = population, sigma

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        values = meta_values(meta)

        def outer(vals: Params) -> torch.Tensor:
            return call_with_meta(meta, vals, lambda m: task_outer_loss(loop, m, task, create_graph=False,
                                                                         on_step=guard))

        pairs = self.population // 2
        with torch.no_grad():
            grads = {k: torch.zeros_like(v) for k, v in values.items()}
            for _ in range(pairs):
                noise = {k: torch.randn_like(v) for k, v in values.items()}
                plus = outer({k: v + self.sigma * noise[k] for k, v in values.items()})
                minus = outer({k: v - self.sigma * noise[k] for k, v in values.items()})
                scale = (plus - minus) / (2 * self.sigma * pairs)
                grads = {k: grads[k] + scale * noise[k] for k in grads}
            loss = outer(values)
        return TaskObjective(linear_surrogate(meta, grads), loss)
