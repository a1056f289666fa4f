"""Forward-mode meta-gradients: tangents carried through the unrolled loop."""
from __future__ import annotations

from typing import Callable, Literal

import torch

from metaopt.estimators.base import (
    AbstractEstimator,
    EstimatorUnsupported,
    TaskObjective,
    call_with_meta,
    map_leading_axis,
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


def _one_hot_tangents(values: Params, start: int, stop: int) -> Params:
    """The one-hot tangents of the meta-parameter scalars start..stop-1 (in `values`' order, each tensor's entries in
    order), stacked: {name: [stop - start, *shape]}."""
    tangents, offset = {}, 0
    for name, value in values.items():
        block = torch.zeros(stop - start, value.numel(), dtype=value.dtype, device=value.device)
        first, last = max(start, offset), min(stop, offset + value.numel())
        if first < last:
            rows = torch.arange(first - start, last - start, device=value.device)
            block[rows, torch.arange(first - offset, last - offset, device=value.device)] = 1
        tangents[name] = block.view(stop - start, *value.shape)
        offset += value.numel()
    return tangents


@register("forward")
class ForwardMode(AbstractEstimator):
    """Forward-mode differentiation of the unroll (`torch.func.jvp`, forward-over-reverse inner gradients).

    mode="exact": one forward pass per meta-parameter scalar, with a one-hot
    tangent; exact (equals `full` to rounding). Memory O(1) in T, time O(N T) for
    N meta-scalars: for a few hyperparameters, e.g. learning rates (Franceschi et
    al. 2017, forward-mode hypergradients; RTRL). Refuses more than `max_scalars`.
    `tangents_per_pass` > 1 pushes that many one-hot tangents through one pass (vmapped over the tangents): the
    per-op cost is shared, and the tangents' memory grows with it (`experiments/bench_stacking.py --estimators
    forward forward_passes`: sinusoid MLP, 6 scalars in one pass, 2.7x faster stacked, 4.6x the tensor bytes;
    conv4, 18 scalars, 2x slower stacked but 2.2x faster task by task, which `batching="auto"` times and picks).

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
      tangents_per_pass: one-hot tangents per forward pass (mode="exact"; 1: one at a time). None: the planner's
        choice, one or the most per pass that fits (all, else a doubling), timed under `batching="auto"`
        (`pass_variants`); one where nothing plans it.
    """

    exact = True
    second_order = True
    stacks = True  # exact mode (random mode draws its tangents per task: see stacked_blocker)
    per_pass = "tangents_per_pass"

    def __init__(self, mode: Literal["exact", "random"] = "exact", directions: int = 1, max_scalars: int = 256,
                 seed: int = 0, tangents_per_pass: int | None = None):
        if mode not in ("exact", "random"):
            raise ValueError(f"forward: mode must be 'exact' or 'random', got {mode!r}")
        if directions < 1:
            raise ValueError(f"forward: directions must be >= 1, got {directions}")
        if tangents_per_pass is not None and tangents_per_pass < 1:
            raise ValueError(f"forward: tangents_per_pass must be >= 1 (or None: the planner's choice), got "
                             f"{tangents_per_pass}")
        self.mode, self.directions, self.max_scalars, self.seed = mode, directions, max_scalars, seed
        self.tangents_per_pass = tangents_per_pass
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

    def per_pass_counts(self, loop: InnerLoop, meta: MetaParams) -> list[int]:
        """Exact mode: one tangent per pass, doubling (2, 4, 8, ...), or every scalar's in one."""
        n = sum(v.numel() for v in meta_values(meta).values())
        return self.doubling(2, n) if self.mode == "exact" else []

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
            loss, grads = self._passes(outer, values)
        else:
            grads = {k: torch.zeros_like(v) for k, v in values.items()}
            for _ in range(self.directions):
                tangent = {k: self.noise_like(v) for k, v in values.items()}
                loss, derivative = _jvp(outer, values, tangent)
                grads = {k: grads[k] + derivative.sum() * tangent[k] / self.directions for k in grads}
        return TaskObjective(task_surrogates(meta, grads, loss), loss.detach())  # stacked: per task

    def _passes(self, outer: Callable[[Params], torch.Tensor], values: Params) -> tuple[torch.Tensor, Params]:
        """Exact mode: the loss and every scalar's derivative, `tangents_per_pass` one-hot tangents per pass (one: a
        plain jvp; more: vmapped over the tangents, randomness="same" so that each tangent of a pass differentiates
        the same draws, an augmentation's)."""
        total = sum(v.numel() for v in values.values())
        derivatives = []
        per_pass = self.tangents_per_pass or 1
        for start in range(0, total, per_pass):
            stop = min(start + per_pass, total)
            losses, derivative = map_leading_axis(lambda tangent: _jvp(outer, values, tangent),
                                                  _one_hot_tangents(values, start, stop), vectorized=stop - start > 1,
                                                  randomness="same")
            derivatives.append(derivative.reshape(stop - start, -1).sum(1))  # stacked: summed over the tasks
        flat = torch.cat(derivatives)
        sizes = [v.numel() for v in values.values()]
        return losses[0], {k: d.view_as(v) for (k, v), d in zip(values.items(), flat.split(sizes))}
