"""Persistent evolution strategies over truncated windows of the unroll (Vicol et al. 2021)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

from metaopt.estimators.base import (
    AbstractEstimator,
    TaskObjective,
    call_with_meta,
    linear_surrogate,
    map_leading_axis,
    meta_values,
    register,
    task_surrogates,
)
from metaopt.guard import StepGuard, shifted
from metaopt.loop import InnerLoop, task_outer_loss, unroll
from metaopt.stacked import StackedLoop
from metaopt.types import InnerState, MetaParams, Params, Task

RunAt = Callable[..., Any]
"""run_at(values, fn, *args) = fn(loop, meta, *args) with the meta-parameters at `values`: one particle's point."""

__all__ = ["PersistentES"]


def check_population(name: str, population: int, sigma: float, particles_per_pass: int | None = 1) -> None:
    """Raise ValueError unless population is an even number >= 2 (antithetic pairs), sigma > 0, and
    particles_per_pass is None (the planner's choice), 1 or an even number (whole pairs)."""
    if population < 2 or population % 2:
        raise ValueError(f"{name}: population must be an even number >= 2, got {population}")
    if sigma <= 0:
        raise ValueError(f"{name}: need sigma > 0 and k >= 1, got sigma={sigma}")
    if particles_per_pass is None:
        return
    if particles_per_pass < 1 or (particles_per_pass > 1 and particles_per_pass % 2):
        raise ValueError(f"{name}: particles_per_pass must be 1 or an even number (whole antithetic pairs), "
                         f"got {particles_per_pass}")


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

    Memory O(1) in T (plus the particles' perturbed meta-values, one per window), time O(population T). Serves
    every slot. This form runs all windows of one task inside one call; the online form (meta updated between
    windows of one long unroll carried across meta-steps) is `OnlinePES`.

    `particles_per_pass` > 1 runs that many particles (whole antithetic pairs) as one unroll vmapped over them:
    the per-op cost is shared and the live state grows with it. The noise is drawn in the same order, so the
    estimate equals the one-at-a-time one to rounding. Where dispatch dominates it is the faster form
    (`experiments/bench_es.py`: the sinusoid MLP, population 16 in one pass, 3.3-3.8x faster vmapped over the
    tasks, 6x task by task); on conv4 it gains 1.03-1.2x at 16x the tensor memory with `allocator=keep`, and is
    up to 2.4x slower with glibc's default allocator (its large buffers page-faulted in at every call).

    Stacked (`batching="stacked"`, what `auto` runs where stacking is not slower: `metaopt.stacked`), a chunk's
    tasks run on their task axis, each row at its own perturbed meta-values (`StackedLoop(row_meta=...)`), and a
    pass of several particles is one unroll of particles x tasks rows (the tasks' data repeated per particle). The
    noise is one draw of [B, *shape] per draw of the per-task code, which is what vmap over B tasks draws, so the
    stacked estimate equals the vmapped one to rounding (tests/test_stacked.py, float64).

    Args:
      population: particles per task (even: population/2 antithetic pairs).
      sigma: perturbation scale.
      k: inner steps per window (truncation length); None: one window, which is plain
        antithetic ES (`es`).
      persistent: accumulate perturbations across windows (PES) or not (truncated ES).
      seed: the perturbations' random stream (`noise_like`).
      particles_per_pass: particles per unroll: 1 (one after another) or an even number (whole pairs, vmapped).
        None: the planner's choice, one or the most per pass that fits (all, else a doubling), timed under
        `batching="auto"` (`pass_variants`); one where nothing plans it.
    """

    exact = False
    second_order = False
    stochastic = True
    per_pass = "particles_per_pass"
    stacks = True  # rows at their own meta-values; tests/test_stacked.py: equals vmap across the kinds

    def __init__(self, population: int = 16, sigma: float = 0.01, k: int | None = 5, persistent: bool = True,
                 seed: int = 0, particles_per_pass: int | None = None):
        check_population(self.name, population, sigma, particles_per_pass)
        if k is not None and k < 1:
            raise ValueError(f"{self.name}: need sigma > 0 and k >= 1, got sigma={sigma}, k={k}")
        self.population, self.sigma, self.k, self.persistent, self.seed = population, sigma, k, persistent, seed
        self.particles_per_pass = particles_per_pass

    def per_pass_counts(self, loop: InnerLoop, meta: MetaParams) -> list[int]:
        """One particle per unroll, whole pairs doubling (2, 4, 8, ...), or the whole population in one."""
        return self.doubling(2, self.population)

    def _window(self, task: Task) -> int:
        return self.k if self.k is not None else max(1, task.inner_steps)

    def _particle_loss(self, task: Task, windows: list[Params], guard: StepGuard | None, run_at: RunAt) -> Tensor:
        """The outer loss of one particle (or, stacked, of one pass's rows) whose meta-values in window j are
        `windows[j]`, each window run at its values by `run_at`."""
        state: InnerState | None = None
        size = self._window(task)
        for j, vals in enumerate(windows):
            batches = task.support[j * size:(j + 1) * size]
            if state is None:  # the initialization belongs to the first window
                state = run_at(vals, lambda lp, m: lp.init(m, task.init))
            hook = shifted(guard, j * size)
            state = run_at(vals, lambda lp, m, s: unroll(lp, s, batches, m, create_graph=False, on_step=hook), state)
        return run_at(windows[-1], lambda lp, m, s: lp.outer_loss(s, task.query, m), state)

    def _perturbations(self, values: Params, n_windows: int, pairs: int) -> tuple[list[Params], list[Params]]:
        """`pairs` antithetic pairs' meta-values, window by window, and each pair's accumulated noise xi.

        Returns (windows, xis): windows[j][name] is [2 * pairs, *shape], the particles in the order plus of the
        first pair, its minus, plus of the next, ...; xis[i] is pair i's xi. Drawn pair by pair, window by window,
        name by name, so that any `particles_per_pass` draws the same noise."""
        windows: list[list[Params]] = [[] for _ in range(n_windows)]
        xis = []
        for _ in range(pairs):
            xi = {k: torch.zeros_like(v) for k, v in values.items()}
            for j in range(n_windows):
                if self.persistent or j == n_windows - 1:
                    noise = {k: self.noise_like(v) for k, v in values.items()}
                    xi = {k: xi[k] + noise[k] for k in xi}
                else:
                    noise = {k: torch.zeros_like(v) for k, v in values.items()}
                windows[j].append({k: v + self.sigma * noise[k] for k, v in values.items()})
                windows[j].append({k: v - self.sigma * noise[k] for k, v in values.items()})
            xis.append(xi)
        return [{k: torch.stack([p[k] for p in particles]) for k in values} for particles in windows], xis

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        stacked = loop if isinstance(loop, StackedLoop) else None
        values = meta_values(meta)
        if stacked is not None:  # each task its own noise: [B, *shape] per draw, as vmap draws it
            values = {k: v.expand(stacked.tasks, *v.shape) for k, v in values.items()}
        n_windows = max(1, -(-task.inner_steps // self._window(task)))
        pairs = self.population // 2
        per_pass = self.particles_per_pass or 1
        pairs_per_pass = max(1, per_pass // 2)
        with torch.no_grad():
            grads = {k: torch.zeros_like(v) for k, v in values.items()}
            for start in range(0, pairs, pairs_per_pass):
                windows, xis = self._perturbations(values, n_windows, min(pairs_per_pass, pairs - start))
                if stacked is not None:
                    losses = self._rows_losses(stacked, meta, task, windows, guard)
                else:
                    def run_at(vals: Params, fn: Callable[..., Any], *args: Any) -> Any:
                        return call_with_meta(meta, vals, lambda m, *a: fn(loop, m, *a), *args)
                    losses = map_leading_axis(lambda particle: self._particle_loss(task, particle, guard, run_at),
                                              windows, vectorized=per_pass > 1)
                for i, xi in enumerate(xis):
                    scale = (losses[2 * i] - losses[2 * i + 1]) / (2 * self.sigma * pairs)  # [] ([B] stacked)
                    grads = {k: grads[k] + (scale if stacked is None else _on_rows(scale, xi[k])) * xi[k]
                             for k in grads}
            loss = task_outer_loss(loop, meta, task, create_graph=False, on_step=guard)
        if stacked is not None:  # the tasks' estimates summed, each task 1/B of the surrogate (the mean gradient)
            return TaskObjective(task_surrogates(meta, {k: g.sum(0) for k, g in grads.items()}, loss), loss)
        return TaskObjective(linear_surrogate(meta, grads), loss)

    def _rows_losses(self, loop: StackedLoop, meta: MetaParams, tasks: Task, windows: list[Params],
                     guard: StepGuard | None) -> Tensor:
        """Outer losses [particles, B] of a stacked chunk's particles (`windows[j][name]`: [particles, B, *shape]).
        `particles_per_pass` particles run as one unroll of particles x B rows (particle-major), each row at its
        own meta-values (`StackedLoop(row_meta=...)`); one particle per pass: B rows."""
        particles = next(iter(windows[0].values())).shape[0]
        group = min(self.particles_per_pass or 1, particles)
        rows = _repeated(tasks, group)
        losses = []
        for first in range(0, particles, group):
            def run_at(vals: Params, fn: Callable[..., Any], *args: Any) -> Any:
                return fn(StackedLoop(loop, group * loop.tasks, loop.functional, row_meta=vals), meta, *args)
            part = [{k: v[first:first + group].flatten(0, 1) for k, v in window.items()} for window in windows]
            losses.append(self._particle_loss(rows, part, guard, run_at).reshape(group, loop.tasks))
        return torch.cat(losses)


def _on_rows(per_row: Tensor, like: Tensor) -> Tensor:
    """[B] values shaped to scale `like`'s rows ([B, *shape]): [B, 1, ..., 1]."""
    return per_row.reshape(-1, *[1] * (like.dim() - 1))


def _repeated(tasks: Task, times: int) -> Task:
    """A stacked batch of tasks repeated `times` over on its task axis (copy i of task b at row i * B + b); a
    support batch that several steps share stays one object."""
    if times == 1:
        return tasks
    done: dict[int, Tensor] = {}

    def repeat(value: Tensor) -> Tensor:
        if id(value) not in done:
            done[id(value)] = value.repeat(times, *[1] * (value.dim() - 1))
        return done[id(value)]
    return tree_map_only(Tensor, repeat, tasks)
