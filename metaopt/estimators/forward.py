"""Forward-mode meta-gradients: tangents carried through the unrolled loop."""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from metaopt.estimators.base import (
    AbstractEstimator,
    EstimatorUnsupported,
    TaskObjective,
    call_with_meta,
    meta_values,
    register,
    task_surrogates,
)
from metaopt.guard import StepGuard
from metaopt.loop import InnerLoop, task_outer_loss
from metaopt.types import MetaParams, Params, Task

__all__ = ["ForwardMode"]


def _jvp(fn: Callable[[Params], torch.Tensor], values: Params, tangent: Params) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.func.jvp(fn, (values,), (tangent,))
    return out[0], out[1]


@register("forward")
class ForwardMode(AbstractEstimator):
    """Forward-mode differentiation of the unroll (`torch.func.jvp`, forward-over-reverse inner gradients).

    mode="exact": one forward pass per meta-parameter scalar, with a one-hot
    tangent; exact (equals `full` to rounding). Memory O(1) in T, time O(N T) for
    N meta-scalars: for a few hyperparameters, e.g. learning rates (Franceschi et
    al. 2017, forward-mode hypergradients; RTRL). Refuses more than `max_scalars`.

    mode="random": the forward gradient (Baydin et al. 2022): with u ~ N(0, I),
    <grad, u> u is unbiased for grad; averages `directions` samples. Memory O(1)
    in T, time O(directions T), any number of meta-parameters, variance ~ N.

    Serves every slot. Exact mode runs under vmap and stacked (`metaopt.stacked`: one jvp per scalar for all of a
    chunk's tasks at once); random mode under vmap (a tangent per task).

    Args:
      mode: "exact" or "random".
      directions: random tangents per task (mode="random").
      max_scalars: the largest meta-parameter count that exact mode accepts.
      seed: the random tangents' stream (mode="random"; `noise_like`).
    """

    exact = True
    second_order = True
    stacks = True  # exact mode (random mode draws its tangents per task: see stacked_blocker)

    def __init__(self, mode: Literal["exact", "random"] = "exact", directions: int = 1, max_scalars: int = 256,
                 seed: int = 0):
        if mode not in ("exact", "random"):
            raise ValueError(f"forward: mode must be 'exact' or 'random', got {mode!r}")
        if directions < 1:
            raise ValueError(f"forward: directions must be >= 1, got {directions}")
        self.mode, self.directions, self.max_scalars, self.seed = mode, directions, max_scalars, seed
        self.exact = mode == "exact"
        self.stochastic = not self.exact
        self.relative_time = float(max_scalars) if self.exact else 1.0  # one forward pass per meta-scalar

    def stacked_blocker(self, loop: InnerLoop, meta: MetaParams) -> str | None:
        if self.mode == "random":
            return "forward (random) draws its tangents per task, which only vmap does (randomness='different')"
        return super().stacked_blocker(loop, meta)

    @classmethod
    def auto_candidates(cls, loop: InnerLoop, meta: MetaParams, steps: int) -> list[AbstractEstimator]:
        return [cls()]  # exact mode; refused above max_scalars

    def check(self, loop: InnerLoop, meta: MetaParams) -> None:
        super().check(loop, meta)
        n = sum(v.numel() for v in meta_values(meta).values())
        if self.mode == "exact" and n > self.max_scalars:
            raise EstimatorUnsupported(
                f"forward (exact) needs one forward pass per meta-parameter scalar, and meta has {n} "
                f"(> max_scalars={self.max_scalars}); use forward with mode='random' (unbiased, noisy), "
                "full or checkpoint")

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        values = meta_values(meta)

        def outer(vals: Params) -> torch.Tensor:
            return call_with_meta(meta, vals, lambda m: task_outer_loss(loop, m, task, on_step=guard))

        if self.mode == "exact":
            grads = {}
            for name, value in values.items():
                derivatives = []
                for i in range(value.numel()):
                    tangent = {k: torch.zeros_like(v) for k, v in values.items()}
                    tangent[name] = F.one_hot(torch.tensor(i), value.numel()).to(value).view_as(value)
                    loss, derivative = _jvp(outer, values, tangent)
                    derivatives.append(derivative.sum())  # stacked: summed over the tasks
                grads[name] = torch.stack(derivatives).view_as(value)
        else:
            grads = {k: torch.zeros_like(v) for k, v in values.items()}
            for _ in range(self.directions):
                tangent = {k: self.noise_like(v) for k, v in values.items()}
                loss, derivative = _jvp(outer, values, tangent)
                grads = {k: grads[k] + derivative.sum() * tangent[k] / self.directions for k in grads}
        return TaskObjective(task_surrogates(meta, grads, loss), loss.detach())  # stacked: per task
