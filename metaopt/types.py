"""The nouns of metaopt: parameters, batches, tasks, inner state.

Everything here is a NamedTuple or a dict of tensors, so `torch.func` transforms
(vmap, jvp, grad) and `torch.utils.checkpoint` see through them as pytrees.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Union

from torch import Tensor, nn

__all__ = [
    "Params",
    "Buffers",
    "OptState",
    "HyperValue",
    "Hyper",
    "Batch",
    "Task",
    "InnerState",
    "Carry",
    "MetaParams",
    "LossFn",
]

Params = dict[str, Tensor]
"""Inner parameters keyed by `torch.func.functional_call` names ("net.0.weight")."""

Buffers = dict[str, Tensor]
"""Module buffers (e.g. BatchNorm running statistics), keyed like `Params`."""

OptState = tuple[Any, ...]
"""What an inner optimizer keeps between steps (momenta, step count, hidden state): a NamedTuple
(`metaopt.optim.AdamState`, ...) or a tuple of them, whose leaves are tensors or dicts of tensors."""

HyperValue = Union[float, Tensor, Mapping[str, Tensor]]
"""One hyperparameter: a float, a tensor (possibly requiring grad), or one tensor per
parameter name (per-tensor or per-element values that broadcast against the parameter)."""

Hyper = dict[str, HyperValue]
"""Hyperparameters handed to an inner optimizer at update time, e.g. {"lr": 0.01}."""

MetaParams = nn.ModuleDict
"""Slot name ("init", "optimizer", "loss", "data") -> meta-parameter module."""


class Batch(NamedTuple):
    """One batch of examples.

    Attributes:
      x: inputs, shape [n, *input_shape] (or [B, n, *input_shape] for a batch of tasks).
      y: targets, shape [n, *target_shape] (or [B, n, ...]).
    """

    x: Tensor
    y: Tensor


class Task(NamedTuple):
    """One inner problem: a support batch per inner step, and a query batch.

    For MAML the same support batch is used at every step (`Task.repeat`), so
    `len(task.support)` is the number of inner steps T. A batch of tasks is a Task
    whose tensors carry a leading task axis of size B (see `metaopt.batching`).

    `init`, when given, is the task's own starting point of the inner parameters
    (a fresh random initialization per task, as dataset distillation and learned
    optimizers train on; see `metaopt.tasks.RandomInit`). It is data, not a
    meta-parameter, so recomputing a task (checkpointing, antithetic ES pairs)
    starts from the same point. None: the "init" meta-parameter or the model's own.

    `carry`, when given, is what an online estimator carried over from this task's previous
    window (`Carry`; see `metaopt.online`): the task is then one window of a longer unroll.
    Estimators that are not online ignore it.
    """

    support: tuple[Batch, ...]
    query: Batch
    init: Params | None = None
    carry: "Carry | None" = None

    @property
    def inner_steps(self) -> int:
        return len(self.support)

    @staticmethod
    def repeat(support: Batch, query: Batch, inner_steps: int) -> "Task":
        """A task that takes `inner_steps` steps on the same support batch."""
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        return Task(support=(support,) * inner_steps, query=query)


class InnerState(NamedTuple):
    """The state carried from one inner step to the next.

    Attributes:
      params: the inner (fast) parameters.
      buffers: module buffers, updated functionally (never in place on the model).
      opt_state: the inner optimizer's state.
      anchor: the initial parameters, kept when the inner loss has a proximal term
        (iMAML); an empty dict otherwise.
    """

    params: Params
    buffers: Buffers
    opt_state: OptState
    anchor: Params


class Carry(NamedTuple):
    """An online estimator's state carried from one window of a task's unroll to the next.

    Attributes:
      fresh: bool, [] per task ([B] for a batch of tasks): True where the task's unroll starts
        in this window (a new task), so `state` is not used for it.
      state: what the estimator returned for this task after its previous window (a pytree of
        tensors with the task axis first in a batch; opaque to everything but the estimator).
    """

    fresh: Tensor
    state: Any


LossFn = Callable[[Tensor, Tensor], Tensor]
"""A loss: (predictions, targets) -> scalar tensor (mean over examples)."""
