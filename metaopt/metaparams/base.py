"""Meta-parameter kinds: ordinary modules that fill one slot of the inner loop.

A kind's `nn.Parameter`s are the meta-parameters; the outer optimizer takes
`meta.parameters()`. Bases are abstract and one per slot; kinds are final. No
kind knows which estimator runs (this package never imports `estimators`).
"""
from __future__ import annotations

import abc
from typing import ClassVar, Literal

from torch import Tensor, nn

from metaopt.optim import InnerOptimizer
from metaopt.types import Batch, Hyper, LossFn, MetaParams, OptState, Params

__all__ = [
    "AbstractMetaParam",
    "AbstractInitMetaParam",
    "AbstractOptimizerMetaParam",
    "AbstractLossMetaParam",
    "AbstractDataMetaParam",
    "meta_params",
    "param_key",
    "param_name",
]

Slot = Literal["init", "optimizer", "loss", "data"]


def param_key(name: str) -> str:
    """A functional_call name ("net.0.weight") as a ParameterDict key, which may not hold "."."""
    return name.replace(".", "/")


def param_name(key: str) -> str:
    """Inverse of `param_key`."""
    return key.replace("/", ".")


class AbstractMetaParam(nn.Module, abc.ABC):
    """A module of meta-parameters for one slot of the inner loop."""

    slot: ClassVar[Slot]


class AbstractInitMetaParam(AbstractMetaParam):
    """The "init" slot: where inner training starts."""

    slot = "init"

    @abc.abstractmethod
    def initial_params(self) -> Params:
        """The inner parameters at step 0, keyed like the model's `named_parameters()`."""


class AbstractOptimizerMetaParam(AbstractMetaParam):
    """The "optimizer" slot: hyperparameters of the inner optimizer."""

    slot = "optimizer"
    elementwise: ClassVar[bool] = True
    """Whether `init_state` and `update` are the loop's optimizer's (so elementwise where it is: a batch of
    tasks on its task axis steps at once, `metaopt.stacked`); a learned update rule sets False."""

    @abc.abstractmethod
    def hyper(self) -> Hyper:
        """Hyperparameters that override the inner optimizer's defaults, e.g. {"lr": {...}}."""

    def init_state(self, optimizer: InnerOptimizer, params: Params) -> OptState:
        """The optimizer state at step 0. Default: the loop's optimizer's."""
        return optimizer.init(params)

    def update(self, optimizer: InnerOptimizer, params: Params, grads: Params, opt_state: OptState,
               hyper: Hyper) -> tuple[Params, OptState]:
        """One update. Default: the loop's optimizer with `hyper` (this kind's `hyper()`).

        A learned update rule (`LearnedOptimizer`) overrides this and `init_state` and
        ignores `optimizer`.
        """
        return optimizer.update(params, grads, opt_state, hyper)


class AbstractLossMetaParam(AbstractMetaParam):
    """The "loss" slot: the inner training loss."""

    slot = "loss"

    @abc.abstractmethod
    def inner_loss(self, pred: Tensor, batch: Batch, params: Params, base_loss: LossFn) -> Tensor:
        """The scalar inner loss.

        Args:
          pred: the model's predictions on `batch.x`.
          batch: the support batch (inputs and targets).
          params: the inner parameters (for regularizers).
          base_loss: the task's own loss `base_loss(pred, y)`, to add to or to replace.
        """


class AbstractDataMetaParam(AbstractMetaParam):
    """The "data" slot: what the inner loop trains on."""

    slot = "data"

    @abc.abstractmethod
    def transform(self, batch: Batch) -> Batch:
        """The support batch actually used by one inner step."""


def meta_params(*kinds: AbstractMetaParam) -> MetaParams:
    """Key meta-parameter modules by their slot: `meta_params(Init(m), LearningRates(m))`.

    Raises:
      ValueError: two modules claim the same slot, or a module is not a meta-parameter kind.
    """
    meta = nn.ModuleDict()
    for kind in kinds:
        if not isinstance(kind, AbstractMetaParam):
            raise ValueError(f"{type(kind).__name__} is not a meta-parameter kind "
                             "(subclass one of metaopt.metaparams.Abstract*MetaParam)")
        if kind.slot in meta:
            raise ValueError(f"two meta-parameters for slot {kind.slot!r}: "
                             f"{type(meta[kind.slot]).__name__} and {type(kind).__name__}")
        meta[kind.slot] = kind
    return meta
