"""Supervised pretraining as a loop: a classifier over every training class, evaluated as a ProtoNet.

The non-episodic baseline of few-shot learning (Chen et al. 2019, "A Closer Look at Few-shot Classification";
Tian et al. 2020, "Rethinking Few-Shot Image Classification"): train the backbone with one linear head over all
training classes by plain cross-entropy, then drop the head and classify a new task's queries by the nearest
support prototype of the learned embedding. Here it is a loop like any other, so it trains, checkpoints, plans,
evaluates and is scored on Lake's runs by the same machinery as a ProtoNet.
"""
from __future__ import annotations

import inspect

from torch import Tensor, nn

from metaopt import losses
from metaopt.class_means import PrototypeState
from metaopt.loop import call_module
from metaopt.optim import InnerOptimizer
from metaopt.prototypes import PrototypeLoop
from metaopt.support_tuning import SupportTuning
from metaopt.types import Batch, Buffers, Hyper, InnerState, LossFn, MetaParams, Params

__all__ = ["ClassifierLoop"]


class ClassifierLoop(PrototypeLoop):
    """A backbone with a linear head over all training classes, trained as a plain classifier; a ProtoNet on the
    backbone's embedding at test time.

    Training tasks have no inner step (`inner_steps=0`): a task is one batch of labelled images whose labels are
    the training classes' global indices (`Omniglot(global_labels=True)`), and the outer loss is the cross-entropy
    of the model's head on it, so the "meta-gradient" of the "init" slot (`Init(model)`, head included) through
    `full` is the plain gradient of that loss: supervised pretraining by the meta-training machinery (outer
    optimizer, schedule, time limit, checkpoints). Evaluation tasks take one inner step on the support, as a
    ProtoNet's: prototypes are the class means of the embedding before the head (`model(x, embed=True)`), and
    queries go to the nearest one (`PrototypeLoop`); the head is not used. Support tuning and test-time views
    work as for a ProtoNet.

    Args:
      model: a classifier whose `forward(x, embed=True)` returns the embedding before its head (`Conv4` with
        `out_features` >= the number of training classes; labels beyond the head's width are an error).
      optimizer: unused (accepted so configs build every loop alike).
      loss_fn: the classification loss (cross-entropy), on the head's logits in training and on the prototype
        logits in evaluation.
      n_way: classes per evaluation task at most (labels 0..n_way-1), as `PrototypeLoop`'s.
      support_tuning: as `PrototypeLoop`'s (evaluation only).

    Raises:
      ValueError: the model's forward takes no `embed` argument.
    """

    def __init__(self, model: nn.Module, optimizer: InnerOptimizer | None = None,
                 loss_fn: LossFn = losses.cross_entropy, n_way: int = 5,
                 support_tuning: SupportTuning | None = None, **unused: object):
        if "embed" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"ClassifierLoop: the model's forward ({type(model).__name__}) takes no `embed` "
                             "argument, so its embedding before the head cannot be read (use Conv4)")
        super().__init__(model, optimizer, loss_fn, n_way, support_tuning)

    def __repr__(self) -> str:
        return f"ClassifierLoop(model={type(self.model).__name__}, n_way={self.n_way})"

    def step(self, state: InnerState, batch: Batch, meta: MetaParams, *, create_graph: bool = True,
             hyper: Hyper | None = None) -> InnerState:
        """Evaluation only (a ProtoNet's step: the support's prototypes). Training has no inner step."""
        if create_graph:
            raise ValueError("ClassifierLoop: a training task takes no inner step (train with inner_steps=0; the "
                             "support step that makes prototypes is for evaluation, create_graph=False)")
        return super().step(state, batch, meta, create_graph=create_graph, hyper=hyper)

    def forward(self, params: Params, buffers: Buffers, x: Tensor) -> tuple[Tensor, Buffers]:
        """The embedding before the head, [n, D] (what prototypes and support tuning see)."""
        return call_module(self.model, params, buffers, x, embed=True)

    def outer_loss(self, state: InnerState, batch: Batch, meta: MetaParams) -> Tensor:
        """After a support step (evaluation): the ProtoNet's loss on the queries. Without one (training, zero
        inner steps): the head's cross-entropy on the batch's global class labels."""
        if isinstance(state.opt_state, PrototypeState):
            return super().outer_loss(state, batch, meta)
        logits = call_module(self.model, state.params, state.buffers, batch.x)[0]
        return self.outer_loss_fn(logits, batch.y)
