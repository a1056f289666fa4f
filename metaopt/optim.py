"""Pure, differentiable inner optimizers.

An `InnerOptimizer` is optax's `(init, update)` pair, with the hyperparameters
handed to `update` at every call (like optax's `inject_hyperparams`): the floats
given to the constructor are only defaults, and a meta-parameter in the inner
loop's "optimizer" slot overrides them with tensors that require grad. A value
may be a float, a scalar tensor, or a dict {parameter name: tensor} whose
tensors broadcast against each parameter (per-tensor or per-element values).

Every update is out of place, so gradients flow through the parameters, the
optimizer state and the hyperparameters.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, cast

import torch
from torch import Tensor

from metaopt.types import Hyper, HyperValue, OptState, Params

__all__ = ["InnerOptimizer", "sgd", "momentum", "adam", "hyper_for"]


class InnerOptimizer(NamedTuple):
    """A pure optimizer.

    Attributes:
      init: params -> initial optimizer state.
      update: (params, grads, opt_state, hyper) -> (new params, new opt_state); `hyper`
        overrides the defaults key by key.
      defaults: the constructor's hyperparameters.
      name: "sgd", "momentum", "adam", ...
    """

    init: Callable[[Params], OptState]
    update: Callable[[Params, Params, OptState, Hyper], tuple[Params, OptState]]
    defaults: Hyper
    name: str


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


def _with_weight_decay(params: Params, grads: Params, weight_decay: HyperValue) -> Params:
    if _is_zero(weight_decay):
        return grads
    return {k: g + hyper_for(weight_decay, k) * params[k] for k, g in grads.items()}


def _descend(param: Tensor, step: Tensor, lr: float | Tensor) -> Tensor:
    """param - lr * step as one op (one autograd node, not two): `torch.add(alpha=)` for a number, `addcmul`
    for a tensor lr (a learned per-tensor or per-element lr, broadcast into the parameter's shape)."""
    if not isinstance(lr, Tensor):
        return torch.add(param, step, alpha=-lr)
    return torch.addcmul(param, lr, step, value=-1)


def sgd(lr: float = 0.01, weight_decay: float = 0.0) -> InnerOptimizer:
    """Plain gradient descent: p <- p - lr * (g + weight_decay * p).

    Args:
      lr: default learning rate.
      weight_decay: default L2 coefficient (added to the gradient, as torch.optim.SGD).
    """
    defaults: Hyper = {"lr": lr, "weight_decay": weight_decay}

    def init(params: Params) -> OptState:
        return {}

    def update(params: Params, grads: Params, opt_state: OptState, hyper: Hyper) -> tuple[Params, OptState]:
        h = {**defaults, **hyper}
        grads = _with_weight_decay(params, grads, h["weight_decay"])
        lr = h["lr"]
        return {k: _descend(p, grads[k], hyper_for(lr, k)) for k, p in params.items()}, opt_state

    return InnerOptimizer(init, update, defaults, "sgd")


def momentum(lr: float = 0.01, momentum: float = 0.9, nesterov: bool = False,
             weight_decay: float = 0.0) -> InnerOptimizer:
    """Heavy-ball SGD with torch.optim.SGD's convention (no dampening).

    buf <- momentum * buf + g;  p <- p - lr * buf   (nesterov: p <- p - lr * (g + momentum * buf)).
    The buffer starts at zero, which equals torch's "buf = g at the first step".

    Args:
      lr: default learning rate.
      momentum: default momentum coefficient.
      nesterov: use Nesterov's look-ahead form.
      weight_decay: default L2 coefficient.
    """
    defaults: Hyper = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}

    def init(params: Params) -> OptState:
        return {"momentum_buffer": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(params: Params, grads: Params, opt_state: OptState, hyper: Hyper) -> tuple[Params, OptState]:
        h = {**defaults, **hyper}
        grads = _with_weight_decay(params, grads, h["weight_decay"])
        old = opt_state["momentum_buffer"]
        assert isinstance(old, dict)
        buf = {k: hyper_for(h["momentum"], k) * old[k] + g for k, g in grads.items()}
        if nesterov:
            direction = {k: g + hyper_for(h["momentum"], k) * buf[k] for k, g in grads.items()}
        else:
            direction = buf
        new = {k: p - hyper_for(h["lr"], k) * direction[k] for k, p in params.items()}
        return new, {"momentum_buffer": buf}

    return InnerOptimizer(init, update, defaults, "momentum")


def adam(lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         eps_root: float = 1e-16, weight_decay: float = 0.0) -> InnerOptimizer:
    """Adam (Kingma & Ba 2015) with bias correction, as torch.optim.Adam.

    p <- p - lr * m_hat / (sqrt(v_hat + eps_root) + eps).

    `eps_root` (optax's name) keeps the derivative of the square root finite where
    v_hat = 0 (a gradient entry that is exactly zero, e.g. a dead ReLU): without it
    second-order meta-gradients through Adam turn into NaN. With eps_root = 1e-16 the
    update differs from torch.optim.Adam by at most ~1e-8 relative.

    Args:
      lr, b1, b2, eps: defaults as in torch.optim.Adam.
      eps_root: added inside the square root (see above).
      weight_decay: default L2 coefficient added to the gradient (Adam, not AdamW).
    """
    defaults: Hyper = {"lr": lr, "b1": b1, "b2": b2, "eps": eps, "eps_root": eps_root,
                       "weight_decay": weight_decay}

    def init(params: Params) -> OptState:
        first = next(iter(params.values()))
        return {
            "step": torch.zeros((), dtype=first.dtype, device=first.device),
            "exp_avg": {k: torch.zeros_like(p) for k, p in params.items()},
            "exp_avg_sq": {k: torch.zeros_like(p) for k, p in params.items()},
        }

    def update(params: Params, grads: Params, opt_state: OptState, hyper: Hyper) -> tuple[Params, OptState]:
        h = {**defaults, **hyper}
        grads = _with_weight_decay(params, grads, h["weight_decay"])
        step = cast(Tensor, opt_state["step"]) + 1
        m_old, v_old = cast(Params, opt_state["exp_avg"]), cast(Params, opt_state["exp_avg_sq"])
        m, v, new = {}, {}, {}
        for k, p in params.items():
            b1_k, b2_k = hyper_for(h["b1"], k), hyper_for(h["b2"], k)
            m[k] = b1_k * m_old[k] + (1 - b1_k) * grads[k]
            v[k] = b2_k * v_old[k] + (1 - b2_k) * grads[k] ** 2
            m_hat = m[k] / (1 - b1_k ** step)
            v_hat = v[k] / (1 - b2_k ** step)
            denom = torch.sqrt(v_hat + hyper_for(h["eps_root"], k)) + hyper_for(h["eps"], k)
            new[k] = p - hyper_for(h["lr"], k) * m_hat / denom
        return new, {"step": step, "exp_avg": m, "exp_avg_sq": v}

    return InnerOptimizer(init, update, defaults, "adam")
