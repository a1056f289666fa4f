"""Online PES: one window of each task's long unroll per meta-step, particles carried across meta-steps."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from metaopt.estimators.base import (
    AbstractEstimator,
    TaskObjective,
    call_with_meta,
    linear_surrogate,
    map_leading_axis,
    meta_values,
    register,
    stack_trees,
)
from metaopt.estimators.pes import check_population
from metaopt.guard import StepGuard
from metaopt.loop import InnerLoop, unroll
from metaopt.types import Carry, InnerState, MetaParams, Params, Task

__all__ = ["OnlinePES", "OnlinePESState"]


class OnlinePESState(NamedTuple):
    """What online PES carries per task between windows (`Task.carry.state`).

    Attributes:
      plus, minus: the inner states of the antithetic particles, [pairs, ...] on every leaf (after
        the window that ran, under meta + sigma xi_j and meta - sigma xi_j).
      xi: the perturbations accumulated since the task's unroll started, [pairs, *meta shape] per
        meta-parameter (the minus particle's are -xi).
    """

    plus: InnerState
    minus: InnerState
    xi: dict[str, Tensor]


@register("online_pes")
class OnlinePES(AbstractEstimator):
    """PES in its online form (Vicol et al. 2021, Algorithm 1): the task is one window of a longer unroll.

    Each antithetic particle pair keeps its own inner trajectory and its accumulated perturbation
    xi across meta-steps (`Task.carry`, fed by `metaopt.online.OnlineTasks`); the meta-parameters
    may change between windows. In each window the pair draws a fresh e, runs the window's K steps
    from its carried states under meta + sigma e and meta - sigma e, adds e to xi, and contributes
    (L+ - L-) xi / (2 sigma pairs), where L is the outer loss (query batch) at the window's end.
    With meta fixed, the window's estimate is unbiased for the gradient of the Gaussian-smoothed
    outer loss at that window's end through the *whole* unroll so far (the initialization and every
    earlier step included), so over a trajectory the estimates sum to the gradient of the sum of the
    window-end losses: for a learned optimizer, the loss along training, not only at its end.
    Truncated backprop over the same windows is biased (it cannot see how meta acted before the
    window); online PES is not, at the price of ES's variance.

    A task without a carry, or whose `Carry.fresh` is set, starts its unroll in this window
    (`InnerLoop.init` under the perturbed meta-parameters): on ordinary tasks this is antithetic ES
    of the final loss (`es`). Memory: O(1) in the horizon, plus 2 x pairs carried inner states per
    task. Time: O(population K) per window. The reported outer loss is the mean over particles of
    (L+ + L-) / 2, the smoothed window-end loss (no unperturbed trajectory is run). Serves every slot.

    Args:
      population: particles per task (even: population/2 antithetic pairs, each with two trajectories).
      sigma: perturbation scale.
      seed: the perturbations' random stream (`noise_like`).
      particles_per_pass: particles per window pass: 1 (one after another) or an even number (whole pairs, one
        unroll vmapped over them; the same noise, drawn in the same order); None, as for `pes`, is one (the planner
        does not choose it here). On `experiment=learned_optimizer_online`
        all 16 in one pass gain nothing (0.96x with `allocator=keep`, 0.56x with the system allocator:
        `experiments/bench_es.py --problems learned_optimizer_online`): the LSTM rule's arithmetic dominates there.
    """

    exact = False
    second_order = False
    stochastic = True
    online = True

    def __init__(self, population: int = 16, sigma: float = 0.01, seed: int = 0, particles_per_pass: int | None = 1):
        check_population(self.name, population, sigma, particles_per_pass)
        self.population, self.sigma, self.seed, self.particles_per_pass = population, sigma, seed, particles_per_pass

    def _start(self, loop: InnerLoop, meta: MetaParams, task: Task, values: Params, carried: InnerState | None,
               fresh: Tensor | None) -> InnerState:
        """The particle's state at the window's start: its carried state, or the initial one where fresh."""
        initial = call_with_meta(meta, values, lambda m: loop.init(m, task.init))
        if carried is None or fresh is None:
            return initial
        return tree_map(lambda new, old: torch.where(fresh, new, old), initial, carried)

    def _windows(self, loop: InnerLoop, meta: MetaParams, task: Task, values: Params, before: InnerState | None,
                 guard: StepGuard | None) -> tuple[Tensor, InnerState]:
        """The window of each particle whose meta-values are in `values` ([particles, *shape]) from its carried
        state in `before` (leaves [particles, ...], or None): the window-end losses [particles] and the states at
        the window's end (leaves [particles, ...]). One after another where `particles_per_pass` is 1, else one
        unroll vmapped over the particles (randomness="different", as separate unrolls)."""
        fresh = None if task.carry is None else task.carry.fresh

        def window(vals: Params, carried: InnerState | None) -> tuple[Tensor, InnerState]:
            state = self._start(loop, meta, task, vals, carried, fresh)
            state = call_with_meta(meta, vals, lambda m, s: unroll(loop, s, task.support, m, create_graph=False,
                                                                   on_step=guard), state)
            return call_with_meta(meta, vals, lambda m, s: loop.outer_loss(s, task.query, m), state), state

        return map_leading_axis(window, values, before, vectorized=(self.particles_per_pass or 1) > 1)

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        values = meta_values(meta)
        carry: Carry | None = task.carry
        carried: OnlinePESState | None = None if carry is None else carry.state
        pairs = self.population // 2
        pairs_per_pass = max(1, (self.particles_per_pass or 1) // 2)
        ends, states, xis = [], [], []
        with torch.no_grad():
            for start in range(0, pairs, pairs_per_pass):
                # Particles in the order plus, minus of each pair: the noise is drawn pair by pair as before.
                pass_pairs = range(start, min(start + pairs_per_pass, pairs))
                noises = [{k: self.noise_like(v) for k, v in values.items()} for _ in pass_pairs]
                xis += [noise if carried is None or carry is None else
                        {k: torch.where(carry.fresh, 0.0, carried.xi[k][p]) + noise[k] for k in noise}
                        for p, noise in zip(pass_pairs, noises)]
                vals = {k: torch.stack([v + sign * self.sigma * noise[k] for noise in noises for sign in (1.0, -1.0)])
                        for k, v in values.items()}
                before = None if carried is None else tree_map(
                    lambda plus, minus: torch.stack([x for p in pass_pairs for x in (plus[p], minus[p])]),
                    carried.plus, carried.minus)
                window_ends, window_states = self._windows(loop, meta, task, vals, before, guard)
                ends.append(window_ends)
                states.append(window_states)
            ends_all = torch.cat(ends)  # [population]: plus, minus of each pair
            state_all = tree_map(lambda *leaves: torch.cat(leaves), *states)
            scales = (ends_all[0::2] - ends_all[1::2]) / (2 * self.sigma * pairs)
            grads = {k: torch.zeros_like(v) for k, v in values.items()}
            for scale, xi in zip(scales, xis):
                grads = {k: grads[k] + scale * xi[k] for k in grads}
            losses = 0.5 * (ends_all[0::2] + ends_all[1::2])
        state_out = OnlinePESState(tree_map(lambda v: v[0::2], state_all), tree_map(lambda v: v[1::2], state_all),
                                   stack_trees(xis))
        return TaskObjective(linear_surrogate(meta, grads), losses.mean(), carry=state_out)
