"""Antithetic evolution strategies on the meta-parameters."""
from __future__ import annotations

from metaopt.estimators.base import register
from metaopt.estimators.pes import PersistentES

__all__ = ["EvolutionStrategies"]


@register("es")
class EvolutionStrategies(PersistentES):
    """Antithetic ES: (1 / (2 sigma n)) sum_i [L(meta + sigma e_i) - L(meta - sigma e_i)] e_i, e_i ~ N(0, I).

    Zeroth order: only forward unrolls, no inner-gradient graph, so memory is O(1)
    in T and it works through non-differentiable inner loops. Time O(population T).
    Unbiased for the gradient of the Gaussian-smoothed outer loss (equal to the
    true gradient up to O(sigma^2)); variance grows with the number of
    meta-parameters (Salimans et al. 2017). Serves every slot. It is PES with one
    window covering the whole unroll (one perturbation per particle pair).

    Args:
      population: perturbations per task (even: population/2 antithetic pairs).
      sigma: perturbation scale.
      seed: the perturbations' random stream.
      particles_per_pass: unrolls run as one vmapped pass (1, whole pairs, or None: the planner's choice; see
        `PersistentES`).
    """

    def __init__(self, population: int = 16, sigma: float = 0.01, seed: int = 0, particles_per_pass: int | None = None):
        super().__init__(population, sigma, k=None, seed=seed, particles_per_pass=particles_per_pass)
