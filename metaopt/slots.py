"""What the inner loop calls on each meta-parameter slot: the one definition of the slot interfaces.

`metaopt.loop.InnerLoop` is the only reader of slots; the abstract bases in
`metaopt.metaparams.base` implement these protocols, one per slot.
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor

from metaopt.optim import InnerOptimizer
from metaopt.types import Batch, Hyper, LossFn, OptState, Params

__all__ = ["InitSlot", "OptimizerSlot", "LossSlot", "DataSlot"]


class InitSlot(Protocol):
    """What the inner loop calls on an "init" meta-parameter."""

    def initial_params(self) -> Params: ...


class OptimizerSlot(Protocol):
    """What the inner loop calls on an "optimizer" meta-parameter.

    `hyper` fills the inner optimizer's hyperparameters (learned lrs); `init_state` and
    `update` own the update rule (a learned optimizer replaces it; the others delegate
    to the loop's `InnerOptimizer`).
    """

    def hyper(self) -> Hyper: ...

    def init_state(self, optimizer: InnerOptimizer, params: Params) -> OptState: ...

    def update(self, optimizer: InnerOptimizer, params: Params, grads: Params, opt_state: OptState,
               hyper: Hyper) -> tuple[Params, OptState]: ...


class LossSlot(Protocol):
    """What the inner loop calls on a "loss" meta-parameter."""

    def inner_loss(self, pred: Tensor, batch: Batch, params: Params, base_loss: LossFn) -> Tensor: ...


class DataSlot(Protocol):
    """What the inner loop calls on a "data" meta-parameter."""

    def transform(self, batch: Batch) -> Batch: ...
