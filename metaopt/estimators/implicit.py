"""Implicit differentiation at the inner solution (iMAML and hyperparameter implicit gradients)."""
from __future__ import annotations

from typing import Literal

import torch

from metaopt.estimators.base import AbstractEstimator, EstimatorUnsupported, TaskObjective, register
from metaopt.guard import StepGuard
from metaopt.linalg import conjugate_gradient, entry_sum, neumann, relative_residual
from metaopt.loop import InnerLoop, detach_state, unroll
from metaopt.stacked import StackedLoop
from metaopt.types import MetaParams, Params, Task

__all__ = ["Implicit"]


@register("implicit")
class Implicit(AbstractEstimator):
    """The meta-gradient at a stationary point of the inner problem, by the implicit function theorem.

    If params* solves grad_params J(params*, meta) = 0, with J the inner objective
    (the inner loss, a "loss" meta-parameter's loss, plus the loop's proximal term
    lambda/2 ||params - params_0||^2), then

        d outer / d meta = - (d/d meta grad_params J(params*, meta))^T v,   (H + damping I) v = grad_params outer(params*)

    with H the Hessian of J at params*. v is found by conjugate gradient or a
    Neumann series on Hessian-vector products (forward-over-reverse; never a dense
    Hessian). For the initialization with a proximal loop this is iMAML
    (Rajeswaran et al. 2019): lambda (H_loss + lambda I)^{-1} grad outer. For
    meta-parameters inside the inner loss (a learned regularizer) it is the
    stationarity form of Pedregosa 2016 / Lorraine et al. 2020.

    Memory O(1) in T (the unroll runs without a graph), time O(T + iters).
    Exact only at an exact stationary point (the unroll must converge); reports
    the solver's relative residual ("residual") and the inner gradient norm at
    the end of the unroll ("stationarity"). The support batch of the last inner
    step (after the "data" slot's transform: learned or augmented training data
    changes J, so dataset distillation is served) defines J. Cannot serve "optimizer"
    meta-parameters (an update rule does not change the stationarity condition), nor
    "init" without a proximal term (the solution would not depend on it): use full,
    checkpoint or forward. Runs under vmap and stacked (`metaopt.stacked`: the chunk's
    B systems solved at once, with per-task inner products, residuals and stationarity).

    Args:
      solver: "cg" (conjugate gradient) or "neumann".
      iters: solver iterations.
      damping: added to the Hessian's diagonal (biases the result; 0 for exact).
      neumann_alpha: Neumann step size (needs eigenvalues of H + damping in (0, 2/alpha)).
    """

    exact = True
    relative_time = 2.0  # an unroll plus a linear solve of Hessian-vector products

    @classmethod
    def auto_candidates(cls, loop: InnerLoop, meta: MetaParams, steps: int) -> list[AbstractEstimator]:
        return [cls()]

    def bias(self, steps: int) -> float:
        """Exact only at a stationary point of the inner problem: ranked after the exact estimators."""
        return 0.01
    second_order = True
    stacks = True  # tests/test_stacked.py: equals vmap (per-task solves)

    def __init__(self, solver: Literal["cg", "neumann"] = "cg", iters: int = 20, damping: float = 0.0,
                 neumann_alpha: float = 0.1):
        if solver not in ("cg", "neumann"):
            raise ValueError(f"implicit: solver must be 'cg' or 'neumann', got {solver!r}")
        if iters < 1 or damping < 0:
            raise ValueError(f"implicit: need iters >= 1 and damping >= 0, got {iters}, {damping}")
        self.solver, self.iters, self.damping, self.neumann_alpha = solver, iters, damping, neumann_alpha

    def check(self, loop: InnerLoop, meta: MetaParams) -> None:
        super().check(loop, meta)
        if "optimizer" in meta:
            raise EstimatorUnsupported(
                "implicit cannot differentiate meta-parameters in slot 'optimizer': an update rule does not change "
                "the inner stationarity condition, so its implicit gradient is zero; use full, checkpoint or forward")
        if loop.adapt is not None:
            raise EstimatorUnsupported(
                f"implicit differentiates the stationarity of every inner parameter, but the loop adapts only "
                f"{list(loop.adapt)} (adapt): the held parameters are not at a stationary point of the inner loss; "
                f"use full, checkpoint or forward")
        if "init" in meta and not loop.proximal:
            raise EstimatorUnsupported(
                "implicit needs InnerLoop(proximal=lambda > 0) to meta-learn an initialization (iMAML): without the "
                "proximal term the inner solution does not depend on the initialization; or use full or checkpoint")

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        if task.inner_steps < 1:
            raise ValueError("implicit: the task has no inner steps, so there is no inner solution")
        # Stacked (a StackedLoop), every loss is per task, [B]: gradients of their sum are each task's own, and the
        # solvers solve the B systems at once (per-task inner products).
        stacked = isinstance(loop, StackedLoop)
        start = loop.init(meta, task.init)
        with torch.no_grad():
            solved = unroll(loop, detach_state(start), task.support, meta, create_graph=False, on_step=guard)
        batch = loop.support_batch(task.support[-1], meta)
        at = solved._replace(anchor={k: v.detach() for k, v in start.anchor.items()})
        params = {k: v.detach() for k, v in solved.params.items()}

        def inner_grad(p: Params) -> Params:
            return torch.func.grad(lambda q: loop.inner_objective(q, at, batch, meta)[0].sum())(p)

        def hvp(v: Params) -> Params:
            hv = torch.func.jvp(inner_grad, (params,), (v,))[1]
            return {k: hv[k] + self.damping * v[k] for k in hv} if self.damping else hv

        with torch.no_grad():
            outer_grad = torch.func.grad(
                lambda p: loop.outer_loss(solved._replace(params=p), task.query, meta).sum())(params)
            if self.solver == "cg":
                v = conjugate_gradient(hvp, outer_grad, self.iters, batched=stacked)
            else:
                v = neumann(hvp, outer_grad, self.iters, self.neumann_alpha)
            residual = relative_residual(hvp, v, outer_grad, batched=stacked)
            squares = {k: g ** 2 for k, g in inner_grad(params).items()}
            stationarity = entry_sum(squares, stacked).sqrt()
            loss = loop.outer_loss(solved, task.query, meta)
        # d/d meta of -<grad_params J(params*, meta), v>, with params* and v held fixed; the anchor
        # carries the initialization's graph.
        live = solved._replace(anchor=start.anchor)
        grad_j = torch.func.grad(lambda q: loop.inner_objective(q, live, batch, meta)[0].sum())(params)
        products = {k: grad_j[k] * v[k] for k in grad_j}
        surrogate = -(entry_sum(products, stacked) if stacked else sum(t.sum() for t in products.values()))
        return TaskObjective(surrogate, loss, {"residual": residual, "stationarity": stationarity})

