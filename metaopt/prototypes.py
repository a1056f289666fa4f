"""Prototypical Networks (Snell et al. 2017) as an inner loop whose adaptation is non-parametric."""
from __future__ import annotations

import copy
from typing import TypeVar

from torch import Tensor, nn

from metaopt import losses
from metaopt.class_means import PrototypeState, class_means, prototype_logits
from metaopt.loop import InnerLoop
from metaopt.optim import InnerOptimizer, sgd
from metaopt.support_tuning import SupportTuning, tune_on_support
from metaopt.types import Batch, Hyper, InnerState, LossFn, MetaParams

__all__ = ["ClassAware", "PrototypeLoop", "PrototypeState", "class_means"]

_Loop = TypeVar("_Loop", bound="ClassAware")


class ClassAware:
    """A loop that answers at most `n_way` classes (labels 0..n_way-1): ProtoNets, Proto-MAML and ensembles of
    ProtoNets (which override `with_n_way` to rebuild their members)."""

    n_way: int

    def with_n_way(self: _Loop, n_way: int) -> _Loop:
        """The same loop (model, optimizer and losses shared) answering `n_way` classes: how an evaluation
        protocol with other ways than training's (Lake's 20-way runs after 60-way episodes) gets its loop."""
        if n_way < 2:
            raise ValueError(f"{type(self).__name__}: n_way must be >= 2, got {n_way}")
        other = copy.copy(self)
        other.n_way = n_way
        return other


class PrototypeLoop(ClassAware, InnerLoop):
    """ProtoNets: a step embeds the support batch and keeps each class's mean embedding.

    `step` replaces the gradient step: prototypes c_k = mean of the embeddings of
    class k's support examples go into the inner state; `predict` returns logits
    -||f(x) - c_k||^2. The embedding network's parameters are meta-learned through
    the "init" slot (`Init(model)`), so `full` backpropagates through the support
    and query embeddings, every estimator and `evaluate` work unchanged, and tasks
    vmap. Use one inner step (the support batch); with several, the last batch's
    prototypes are used. A class with no support example gets no prototype: its logit
    is the dtype's lowest value (probability exactly 0), so a loop built for N classes
    scores tasks of fewer classes exactly as a loop built for theirs (a 60-way training
    loop evaluates 5- and 20-way tasks).

    Args:
      model: the embedding network (e.g. `Conv4(out_features=0)`): [n, ...] -> [n, D].
      optimizer: unused (accepted so configs build every loop alike).
      loss_fn: the outer loss on the logits (cross-entropy).
      n_way: classes per task at most; labels are 0..n_way-1.
      support_tuning: evaluation only: fine-tune the embedding on each task's support before making its
        prototypes (`metaopt.support_tuning`; the tuned parameters then embed the queries too). None: never.
        A loop that tunes refuses to build a meta-gradient; `with_support_tuning` makes one for evaluation. With
        several inner steps each step tunes on from the last step's parameters.
    """

    def __init__(self, model: nn.Module, optimizer: InnerOptimizer | None = None,
                 loss_fn: LossFn = losses.cross_entropy, n_way: int = 5,
                 support_tuning: SupportTuning | None = None, **unused: object):
        super().__init__(model, sgd(lr=0.0), loss_fn)
        if n_way < 2:
            raise ValueError(f"PrototypeLoop: n_way must be >= 2, got {n_way}")
        self.n_way = n_way
        self.support_tuning = support_tuning

    def with_support_tuning(self, tuning: SupportTuning | None) -> "PrototypeLoop":
        """The same loop (model and losses shared) fine-tuning its embedding on each task's support first
        (`tuning`; None or 0 steps: as trained). For evaluation: `evaluate`, the protocols, Lake's runs."""
        other = copy.copy(self)
        other.support_tuning = tuning if tuning is not None and tuning.steps > 0 else None
        return other

    def step(self, state: InnerState, batch: Batch, meta: MetaParams, *, create_graph: bool = True,
             hyper: Hyper | None = None) -> InnerState:
        batch = self.support_batch(batch, meta)
        params = state.params
        if self.support_tuning is not None:
            if create_graph:
                raise ValueError("PrototypeLoop: support_tuning is for evaluation (create_graph=False); a "
                                 "meta-gradient through the tuning is not built: train without it")
            embed = lambda p, x: self.forward(p, state.buffers, x)[0]  # noqa: E731
            params = tune_on_support(embed, params, batch, self.n_way, self.support_tuning)
        embeddings, buffers = self.forward(params, state.buffers, batch.x)
        return InnerState(params, buffers, class_means(embeddings, batch.y, self.n_way), state.anchor)

    def predict(self, state: InnerState, x: Tensor) -> Tensor:
        if not isinstance(state.opt_state, PrototypeState):
            raise ValueError("PrototypeLoop needs one inner step on the support batch before predicting "
                             "(inner_steps >= 1)")
        return prototype_logits(self.forward(state.params, state.buffers, x)[0], state.opt_state)
