"""Tiny, non-degenerate meta-learning problems for exactness tests.

Smooth activations (tanh) so that finite differences are meaningful; inner loops
that do not converge and asymmetric data, so that estimators that differ cannot
agree by accident.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

import metaopt as mo
from metaopt.types import MetaParams, Task

OPTIMIZERS: dict[str, Callable[[], mo.optim.InnerOptimizer]] = {
    "sgd": lambda: mo.optim.sgd(lr=0.1),
    "momentum": lambda: mo.optim.momentum(lr=0.05, momentum=0.9),
    "adam": lambda: mo.optim.adam(lr=0.05),
}

META_KINDS: dict[str, Callable[[torch.nn.Module], MetaParams]] = {
    "init": lambda m: mo.meta_params(mo.Init(m)),
    "lrs_scalar": lambda m: mo.meta_params(mo.LearningRates(m, init=0.1, granularity="scalar")),
    "lrs_tensor": lambda m: mo.meta_params(mo.LearningRates(m, init=(0.05, 0.15), granularity="tensor")),
    "init+lrs_element": lambda m: mo.meta_params(mo.Init(m), mo.LearningRates(m, init=(0.05, 0.15),
                                                                               granularity="element")),
    "weight_decay": lambda m: mo.meta_params(mo.WeightDecay(m, init=0.05)),
    "learned_loss": lambda m: _live(mo.meta_params(
        mo.LearnedLoss(m, pred_features=1, target="regression", input_features=1, hidden=(5,)))),
    "learned_optimizer_lstm": lambda m: _live(mo.meta_params(
        mo.LearnedOptimizer(m, "lstm", hidden=3, decays=(0.5,), base="adam", base_lr=0.05))),
    "learned_optimizer_mlp": lambda m: _live(mo.meta_params(
        mo.LearnedOptimizer(m, "mlp", hidden=3, decays=(0.5,), base_lr=0.05))),
    "synthetic_data": lambda m: mo.meta_params(mo.SyntheticData(m, shape=(1,), n_classes=0, n_per_class=4)),
}


def _live(meta: MetaParams) -> MetaParams:
    """Meta-parameters whose zero-initialized read-outs (LearnedLoss, LearnedOptimizer) are made non-zero,
    so every meta-parameter gets a non-zero meta-gradient and exactness tests can fail."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in meta.named_parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return meta


def tiny_model(hidden: int = 6) -> torch.nn.Module:
    return mo.MLP(1, (hidden, hidden), 1, activation="tanh")


def tiny_tasks(n_tasks: int, inner_steps: int, k_shot: int = 5, seed: int = 0) -> Task:
    """A stacked batch of sinusoid tasks."""
    return mo.Sinusoid(k_shot=k_shot, k_query=7).sample(n_tasks, inner_steps, torch.Generator().manual_seed(seed))


def outer_loss_at(loop: mo.InnerLoop, meta: MetaParams, tasks: Task) -> Tensor:
    """Mean outer loss over the tasks, computed task by task with no tricks (for finite differences)."""
    total = 0.0
    for task in mo.unstack_tasks(tasks):
        state = mo.unroll(loop, loop.init(meta), task.support, meta)
        total = total + loop.outer_loss(state, task.query, meta)
    return total / len(mo.unstack_tasks(tasks))


def central_difference(loop: mo.InnerLoop, meta: MetaParams, tasks: Task, direction: dict[str, Tensor],
                       eps: float = 1e-6) -> float:
    """(f(meta + eps d) - f(meta - eps d)) / (2 eps), perturbing the meta-parameters in place and restoring them."""
    params = dict(meta.named_parameters())

    def shifted(sign: float) -> float:
        with torch.no_grad():
            for k, d in direction.items():
                params[k].add_(sign * eps * d)
            value = outer_loss_at(loop, meta, tasks).item()
            for k, d in direction.items():
                params[k].sub_(sign * eps * d)
        return value

    return (shifted(1.0) - shifted(-1.0)) / (2 * eps)


def assert_unbiased(samples: list[dict[str, Tensor]], reference: dict[str, Tensor], n_directions: int = 3) -> None:
    """The mean of the samples' projections on random directions lies within 4 standard errors (computed
    from the samples) of the reference's."""
    g = torch.Generator().manual_seed(0)
    directions = [{k: torch.randn(v.shape, generator=g) for k, v in reference.items()} for _ in range(n_directions)]

    def project(points: list[dict[str, Tensor]]) -> Tensor:
        return torch.tensor([[sum((p[k] * d[k]).sum() for k in d).item() for p in points] for d in directions])

    projected, truth = project(samples), project([reference])[:, 0]
    mean, stderr = projected.mean(dim=1), projected.std(dim=1) / projected.shape[1] ** 0.5
    assert (stderr > 0).all()
    assert ((mean - truth).abs() < 4 * stderr).all(), f"mean {mean}, reference {truth}, 4 SE {4 * stderr}"
