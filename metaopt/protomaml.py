"""Proto-MAML (Triantafillou et al. 2020, Meta-Dataset): MAML whose linear head starts at the support prototypes."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from metaopt import losses
from metaopt.loop import InnerLoop
from metaopt.optim import InnerOptimizer
from metaopt.prototypes import ClassAware, class_means
from metaopt.types import Batch, Buffers, Hyper, InnerState, LossFn, MetaParams, Params

__all__ = ["ProtoMAMLLoop", "HEAD_WEIGHT", "HEAD_BIAS"]

HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"


class ProtoMAMLLoop(ClassAware, InnerLoop):
    """MAML on an embedding network with a per-task linear head initialized from the support set's prototypes.

    At a task's first inner step the support batch is embedded (f: [n, ...] -> [n, D]) and each class's mean
    embedding c_k gives the head: weight 2 c_k, bias -||c_k||^2 ([N, D] and [N]), so the logits
    f(x) . 2 c_k - ||c_k||^2 are a ProtoNet's -||f(x) - c_k||^2 up to a term equal for every class (the same
    softmax). Then every inner step is a gradient step on body *and* head, as in MAML; the outer loss is the
    adapted model's on the query batch. The head depends on the meta-learned body through the prototypes, and
    exact estimators differentiate through that too (Meta-Dataset's fo-Proto-MAML is `first_order` here). With
    an inner learning rate of 0 it is a ProtoNet (`tests/test_protomaml.py` checks both). A class with no support
    example gets a zero weight and the dtype's lowest bias (probability 0), so a loop built for N classes scores
    tasks of fewer classes as one built for theirs.

    The head exists only inside a task, so meta-parameters keyed by the model's parameters (learned inner
    learning rates, learned optimizers: the "optimizer" slot) have no entry for it and are refused; "init"
    meta-learns the body.

    Args:
      model: the embedding network (e.g. `Conv4(out_features=0)`): [n, ...] -> [n, D].
      optimizer: the inner optimizer (`metaopt.optim`), over body and head.
      loss_fn: inner and outer loss on the logits (cross-entropy).
      n_way: classes per task at most; labels are 0..n_way-1.
      outer_loss_fn, proximal: as in `InnerLoop` (the proximal anchor includes the initial head).
      adapt: as in `InnerLoop`; "head" names the prototype head (`["head"]`: only the head adapts, ANIL's
        Proto-MAML).
    """

    def __init__(self, model: nn.Module, optimizer: InnerOptimizer, loss_fn: LossFn = losses.cross_entropy,
                 n_way: int = 5, outer_loss_fn: LossFn | None = None, proximal: float = 0.0,
                 adapt: Sequence[str] | None = None, **unused: object):
        super().__init__(model, optimizer, loss_fn, outer_loss_fn, proximal, adapt)
        if n_way < 2:
            raise ValueError(f"ProtoMAMLLoop: n_way must be >= 2, got {n_way}")
        self.n_way = n_way

    def adaptable_names(self) -> list[str]:
        return [*super().adaptable_names(), HEAD_WEIGHT, HEAD_BIAS]

    def check(self, meta: MetaParams) -> None:
        super().check(meta)
        if "optimizer" in meta:
            raise ValueError(f"ProtoMAMLLoop: the head is made per task from the support prototypes, so the "
                             f"'optimizer' meta-parameter ({type(meta['optimizer']).__name__}), keyed by the model's "
                             f"parameters, has no entry for it; use a plain inner optimizer")

    def step(self, state: InnerState, batch: Batch, meta: MetaParams, *, create_graph: bool = True,
             hyper: Hyper | None = None) -> InnerState:
        if HEAD_WEIGHT not in state.params:
            state = self._with_head(state, self.support_batch(batch, meta), meta)
        return super().step(state, batch, meta, create_graph=create_graph, hyper=hyper)

    def _with_head(self, state: InnerState, batch: Batch, meta: MetaParams) -> InnerState:
        """The state with the prototype head added (the first step; the optimizer state is made afresh for it)."""
        embeddings, _ = super().forward(state.params, state.buffers, batch.x)
        prototypes, present = class_means(embeddings, batch.y, self.n_way)
        bias = (-(prototypes ** 2).sum(-1)).masked_fill(~present, torch.finfo(prototypes.dtype).min)
        head = {HEAD_WEIGHT: 2 * prototypes, HEAD_BIAS: bias}
        params = {**state.params, **head}
        anchor = {**state.anchor, **head} if self.proximal else state.anchor
        return InnerState(params, state.buffers, self.optimizer_init(meta, params), anchor)

    def forward(self, params: Params, buffers: Buffers, x: Tensor) -> tuple[Tensor, Buffers]:
        """Logits [n, N] of the body's embeddings under the head in `params`."""
        if HEAD_WEIGHT not in params:
            raise ValueError("ProtoMAMLLoop makes its head at the first inner step on the support batch: it needs "
                             "inner_steps >= 1 before predicting")
        body = {k: v for k, v in params.items() if k not in (HEAD_WEIGHT, HEAD_BIAS)}
        embeddings, buffers = super().forward(body, buffers, x)
        return embeddings @ params[HEAD_WEIGHT].T + params[HEAD_BIAS], buffers
