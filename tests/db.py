"""The estimator table: what each estimator promises, so one suite tests them all (torch's OptimizerInfo)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from metaopt import estimators as E

ALL_KINDS = frozenset({"init", "lrs_scalar", "lrs_tensor", "init+lrs_element", "weight_decay", "learned_loss",
                       "learned_optimizer_lstm", "learned_optimizer_mlp", "synthetic_data"})


@dataclass(frozen=True)
class EstimatorInfo:
    """One estimator configuration under test.

    Attributes:
      id: test id.
      make: T -> estimator.
      promise: "exact" (equals full to 1e-6), "unbiased" (mean of samples within 4 standard errors
        of full), or "approximate" (only finite and well-formed).
      kinds: meta-parameter kinds (problems.META_KINDS) it serves; the others must raise EstimatorUnsupported.
      errors: constructor calls that must raise ValueError, with a regex of the message (as torch's
        OptimizerInfo carries its ErrorOptimizerInputs).
    """

    id: str
    make: Callable[[int], E.AbstractEstimator]
    promise: Literal["exact", "unbiased", "approximate"]
    kinds: frozenset[str] = field(default=ALL_KINDS)
    errors: tuple[tuple[Callable[[], object], str], ...] = ()

    def __str__(self) -> str:
        return self.id


ESTIMATORS = [
    EstimatorInfo("full", lambda T: E.Full(), "exact"),
    EstimatorInfo("checkpoint", lambda T: E.Checkpoint(), "exact",
                  errors=((lambda: E.Checkpoint(segment=0), "segment must be >= 1"),)),
    EstimatorInfo("checkpoint_S2", lambda T: E.Checkpoint(segment=2), "exact"),
    EstimatorInfo("truncated_k=T", lambda T: E.Truncated(k=T), "exact",
                  errors=((lambda: E.Truncated(k=0), "k must be >= 1"),)),
    EstimatorInfo("forward_exact", lambda T: E.ForwardMode(max_scalars=20), "exact",
                  frozenset({"lrs_scalar", "lrs_tensor", "weight_decay", "synthetic_data"})),
    EstimatorInfo("forward_exact_3_per_pass", lambda T: E.ForwardMode(max_scalars=20, tangents_per_pass=3), "exact",
                  frozenset({"lrs_scalar", "lrs_tensor", "weight_decay", "synthetic_data"})),
    EstimatorInfo("forward_random", lambda T: E.ForwardMode(mode="random"), "unbiased",
                  errors=((lambda: E.ForwardMode(mode="sideways"), "mode must be 'exact' or 'random'"),
                          (lambda: E.ForwardMode(mode="random", directions=0), "directions must be >= 1, got 0"),
                          (lambda: E.ForwardMode(tangents_per_pass=0), r"tangents_per_pass must be >= 1 \(or None")
                          )),
    EstimatorInfo("es", lambda T: E.EvolutionStrategies(population=2, sigma=1e-4), "unbiased",
                  errors=((lambda: E.EvolutionStrategies(population=3), "population must be an even number"),)),
    EstimatorInfo("pes", lambda T: E.PersistentES(population=2, sigma=1e-4, k=1), "unbiased",
                  errors=((lambda: E.PersistentES(sigma=0), "need sigma > 0"),
                          (lambda: E.PersistentES(k=0), "k >= 1"),
                          (lambda: E.PersistentES(particles_per_pass=3), "1 or an even number"))),
    EstimatorInfo("pes_2_per_pass", lambda T: E.PersistentES(population=4, sigma=1e-4, k=1, particles_per_pass=2),
                  "unbiased"),
    # On a task with no carry, online PES starts the unroll in this window: antithetic ES of the final loss.
    EstimatorInfo("online_pes", lambda T: E.OnlinePES(population=2, sigma=1e-4), "unbiased",
                  errors=((lambda: E.OnlinePES(population=3), "population must be an even number"),
                          (lambda: E.OnlinePES(sigma=0), "need sigma > 0"),
                          (lambda: E.OnlinePES(particles_per_pass=5), "1 or an even number"))),
    EstimatorInfo("online_pes_2_per_pass", lambda T: E.OnlinePES(population=4, sigma=1e-4, particles_per_pass=2),
                  "unbiased"),
    EstimatorInfo("truncated_k=1", lambda T: E.Truncated(k=1), "approximate"),
    EstimatorInfo("first_order", lambda T: E.FirstOrder(), "approximate"),
    EstimatorInfo("truncated_es", lambda T: E.PersistentES(population=2, sigma=1e-4, k=1, persistent=False),
                  "approximate"),
    EstimatorInfo("reptile", lambda T: E.Reptile(), "approximate", frozenset({"init"})),
    # Implicit's exactness needs a converged, proximal inner problem: tested on its own problem.
    EstimatorInfo("implicit", lambda T: E.Implicit(), "approximate",
                  frozenset({"weight_decay", "learned_loss", "synthetic_data"}),
                  errors=((lambda: E.Implicit(solver="lu"), "solver must be 'cg' or 'neumann'"),
                          (lambda: E.Implicit(iters=0), "need iters >= 1"))),
]
