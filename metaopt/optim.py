"""Pure, differentiable inner optimizers, composed from small transforms in the manner of optax.

A `GradientTransform` maps gradients to a descent direction and keeps a typed state (a
NamedTuple: `EmptyState`, `TraceState`, `AdamState`, or a tuple of them for `chain`). An
`InnerOptimizer` is a transform plus the step p <- p - lr * direction (one op per tensor):
`sgd = descend(add_decayed_weights())`, `momentum = descend(chain(add_decayed_weights(), trace()))`,
`adam = descend(chain(add_decayed_weights(), scale_by_adam()))`. A learned update rule
(`metaopt.metaparams.LearnedOptimizer`) composes the same transforms for its features.

Hyperparameters are handed to `update` at every call (like optax's `inject_hyperparams`):
the floats given to the constructors are only defaults, and a meta-parameter in the inner
loop's "optimizer" slot overrides them with tensors that require grad. A value may be a
float, a scalar tensor, or a dict {parameter name: tensor} whose tensors broadcast against
each parameter (per-tensor or per-element values). Each transform reads its own keys
("weight_decay", "momentum", "b1", "b2", "eps", "eps_root"; the optimizer "lr").

Every update is out of place, so gradients flow through the parameters, the optimizer
state and the hyperparameters; states are pytrees, so vmap and checkpointing see through them.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import Tensor

from metaopt.types import Hyper, HyperValue, OptState, Params

__all__ = ["InnerOptimizer", "GradientTransform", "EmptyState", "TraceState", "EmaState", "AdamState",
           "add_decayed_weights", "trace", "ema", "scale_by_adam", "chain", "descend", "adam_rms",
           "sgd", "momentum", "adam", "hyper_for"]


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


class TraceState(NamedTuple):
    """Heavy-ball momentum: the buffer sum_t momentum^(s-t) g_t, one tensor per parameter."""

    trace: Params


class EmaState(NamedTuple):
    """An exponential moving average of the gradient, (1 - decay) sum_t decay^(s-t) g_t (no bias correction)."""

    ema: Params


class AdamState(NamedTuple):
    """Adam's moments: `step` (steps taken, a 0-d tensor), `mu` (first moment), `nu` (second moment)."""

    step: Tensor
    mu: Params
    nu: Params


class GradientTransform(NamedTuple):
    """A pure gradient transformation.

    Attributes:
      init: params -> initial state (a NamedTuple of tensors and dicts of tensors).
      update: (updates, state, params, hyper) -> (new updates, new state); `hyper` holds at least
        `defaults`' keys (the optimizer merges defaults and overrides once per step).
      defaults: the hyperparameters this transform reads, with their default values.
      elementwise: whether it treats every coordinate alike and reads no shape, so that a leading task
        axis on the updates, parameters and per-parameter state is just more coordinates (0-d state
        entries, such as Adam's step, shared by the tasks that step together; hyperparameters broadcast
        from the right): `metaopt.stacked` then applies it to all tasks at once. False: per task, under vmap.
    """

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params, Hyper], tuple[Params, Any]]
    defaults: Hyper
    elementwise: bool = False


class InnerOptimizer(NamedTuple):
    """A pure optimizer: a `GradientTransform` and the step p <- p - lr * direction.

    Attributes:
      init: params -> initial optimizer state.
      update: (params, grads, opt_state, hyper) -> (new params, new opt_state); `hyper`
        overrides the defaults key by key.
      defaults: the hyperparameters (every transform's, and "lr").
      name: "sgd", "momentum", "adam", ...
      elementwise: as `GradientTransform.elementwise` (every built-in optimizer is).
    """

    init: Callable[[Params], OptState]
    update: Callable[[Params, Params, OptState, Hyper], tuple[Params, OptState]]
    defaults: Hyper
    name: str
    elementwise: bool = False


def hyper_for(value: HyperValue, name: str) -> float | Tensor:
    """The value of one hyperparameter for the parameter called `name`."""
    if isinstance(value, Mapping):
        try:
            return value[name]
        except KeyError:
            raise KeyError(f"hyperparameter has no entry for parameter {name!r}; "
                           f"it has {sorted(value)}") from None
    return value


def _is_zero(value: HyperValue) -> bool:
    # Only plain numbers are tested, so no tensor is ever synced to the host.
    return isinstance(value, (int, float)) and value == 0


def _descend(param: Tensor, step: Tensor, lr: float | Tensor) -> Tensor:
    """param - lr * step as one op (one autograd node, not two): `torch.add(alpha=)` for a number, `addcmul`
    for a tensor lr (a learned per-tensor or per-element lr, broadcast into the parameter's shape)."""
    if not isinstance(lr, Tensor):
        return torch.add(param, step, alpha=-lr)
    return torch.addcmul(param, lr, step, value=-1)


def add_decayed_weights(weight_decay: float = 0.0) -> GradientTransform:
    """g <- g + weight_decay * p (L2 added to the gradient, as torch.optim's `weight_decay`). No op at 0."""

    def update(updates: Params, state: EmptyState, params: Params, hyper: Hyper) -> tuple[Params, EmptyState]:
        decay = hyper["weight_decay"]
        if _is_zero(decay):
            return updates, state
        return {k: g + hyper_for(decay, k) * params[k] for k, g in updates.items()}, state

    return GradientTransform(lambda params: EmptyState(), update, {"weight_decay": weight_decay}, elementwise=True)


def trace(momentum: float = 0.9, nesterov: bool = False) -> GradientTransform:
    """Heavy-ball momentum with torch.optim.SGD's convention (no dampening).

    buf <- momentum * buf + g; direction = buf (nesterov: g + momentum * buf). The buffer
    starts at zero, which equals torch's "buf = g at the first step".
    """

    def init(params: Params) -> TraceState:
        return TraceState({k: torch.zeros_like(p) for k, p in params.items()})

    def update(updates: Params, state: TraceState, params: Params, hyper: Hyper) -> tuple[Params, TraceState]:
        m = hyper["momentum"]
        buf = {k: hyper_for(m, k) * state.trace[k] + g for k, g in updates.items()}
        if nesterov:
            return {k: g + hyper_for(m, k) * buf[k] for k, g in updates.items()}, TraceState(buf)
        return buf, TraceState(buf)

    return GradientTransform(init, update, {"momentum": momentum}, elementwise=True)


def ema(decay: float) -> GradientTransform:
    """An exponential moving average of the updates: e <- decay * e + (1 - decay) * g; direction = e.

    `decay` is fixed (not a hyperparameter key), so several EMAs can sit side by side (the learned
    optimizer's momentum features).
    """

    def init(params: Params) -> EmaState:
        return EmaState({k: torch.zeros_like(p) for k, p in params.items()})

    def update(updates: Params, state: EmaState, params: Params, hyper: Hyper) -> tuple[Params, EmaState]:
        new = {k: decay * state.ema[k] + (1 - decay) * g for k, g in updates.items()}
        return new, EmaState(new)

    return GradientTransform(init, update, {}, elementwise=True)


def adam_rms(nu: Tensor, step: Tensor, b2: float | Tensor, eps: float | Tensor,
             eps_root: float | Tensor) -> Tensor:
    """Adam's denominator sqrt(nu / (1 - b2^step) + eps_root) + eps (bias-corrected root mean square).

    `eps_root` (optax's name) keeps the derivative of the square root finite where nu = 0 (a
    gradient entry that is exactly zero, e.g. a dead ReLU): without it second-order
    meta-gradients through Adam turn into NaN.
    """
    return torch.sqrt(nu / (1 - b2 ** step) + eps_root) + eps


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 1e-16) -> GradientTransform:
    """Adam's direction m_hat / (sqrt(v_hat + eps_root) + eps), bias-corrected as torch.optim.Adam."""

    def init(params: Params) -> AdamState:
        first = next(iter(params.values()))
        return AdamState(torch.zeros((), dtype=first.dtype, device=first.device),
                         {k: torch.zeros_like(p) for k, p in params.items()},
                         {k: torch.zeros_like(p) for k, p in params.items()})

    def update(updates: Params, state: AdamState, params: Params, hyper: Hyper) -> tuple[Params, AdamState]:
        step = state.step + 1
        mu, nu, direction = {}, {}, {}
        for k, g in updates.items():
            b1_k, b2_k = hyper_for(hyper["b1"], k), hyper_for(hyper["b2"], k)
            mu[k] = b1_k * state.mu[k] + (1 - b1_k) * g
            nu[k] = b2_k * state.nu[k] + (1 - b2_k) * g ** 2
            rms = adam_rms(nu[k], step, b2_k, hyper_for(hyper["eps"], k), hyper_for(hyper["eps_root"], k))
            direction[k] = mu[k] / (1 - b1_k ** step) / rms
        return direction, AdamState(step, mu, nu)

    return GradientTransform(init, update, {"b1": b1, "b2": b2, "eps": eps, "eps_root": eps_root},
                             elementwise=True)


def chain(*transforms: GradientTransform) -> GradientTransform:
    """The transforms applied in order; the state is the tuple of their states."""
    defaults: Hyper = {}
    for t in transforms:
        clash = set(defaults) & set(t.defaults)
        if clash:
            raise ValueError(f"chain: hyperparameter(s) {sorted(clash)} named by two transforms")
        defaults.update(t.defaults)

    def init(params: Params) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Params, state: tuple[Any, ...], params: Params, hyper: Hyper) -> tuple[Params, tuple[Any, ...]]:
        new_states = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, hyper)
            new_states.append(s)
        return updates, tuple(new_states)

    return GradientTransform(init, update, defaults, elementwise=all(t.elementwise for t in transforms))


def descend(transform: GradientTransform, lr: float, name: str) -> InnerOptimizer:
    """The optimizer p <- p - lr * transform(g): `lr` joins the transform's hyperparameters."""
    if "lr" in transform.defaults:
        raise ValueError("descend: the transform already names a hyperparameter 'lr'")
    defaults: Hyper = {**transform.defaults, "lr": lr}

    def update(params: Params, grads: Params, opt_state: OptState, hyper: Hyper) -> tuple[Params, OptState]:
        h = {**defaults, **hyper}
        direction, opt_state = transform.update(grads, opt_state, params, h)
        return {k: _descend(p, direction[k], hyper_for(h["lr"], k)) for k, p in params.items()}, opt_state

    return InnerOptimizer(transform.init, update, defaults, name, transform.elementwise)


def sgd(lr: float = 0.01, weight_decay: float = 0.0) -> InnerOptimizer:
    """Plain gradient descent: p <- p - lr * (g + weight_decay * p), as torch.optim.SGD."""
    return descend(add_decayed_weights(weight_decay), lr, "sgd")


def momentum(lr: float = 0.01, momentum: float = 0.9, nesterov: bool = False,
             weight_decay: float = 0.0) -> InnerOptimizer:
    """Heavy-ball SGD as torch.optim.SGD(momentum=, nesterov=) (no dampening; see `trace`)."""
    return descend(chain(add_decayed_weights(weight_decay), trace(momentum, nesterov)), lr, "momentum")


def adam(lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         eps_root: float = 1e-16, weight_decay: float = 0.0) -> InnerOptimizer:
    """Adam (Kingma & Ba 2015) with bias correction, as torch.optim.Adam (L2 `weight_decay`, not AdamW).

    With eps_root = 1e-16 (see `adam_rms`) the update differs from torch.optim.Adam by at most
    ~1e-8 relative; eps_root = 0 equals it.
    """
    return descend(chain(add_decayed_weights(weight_decay), scale_by_adam(b1, b2, eps, eps_root)), lr, "adam")
