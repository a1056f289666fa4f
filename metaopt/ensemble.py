"""Ensembles of ProtoNets: members trained apart (other seeds) that answer together at test time."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.loop import InnerLoop
from metaopt.prototypes import ClassAware, PrototypeLoop
from metaopt.support_tuning import SupportTuning
from metaopt.types import Batch, Hyper, MetaParams, Params

__all__ = ["ProtoNetEnsemble", "ensemble_meta"]


def ensemble_meta(metas: Sequence[MetaParams]) -> MetaParams:
    """The members' meta-parameters in one module, member i under "member{i}": one `state_dict` (a run's
    checkpoint) holds the whole ensemble. Not a meta-parameter slot map: `ProtoNetEnsemble` is evaluated with it,
    and `meta_train` trains each member's own meta-parameters, never this."""
    return nn.ModuleDict({f"member{i}": meta for i, meta in enumerate(metas)})


class ProtoNetEnsemble(ClassAware, InnerLoop):
    """Several ProtoNets (`PrototypeLoop`s with their meta-parameters, e.g. runs trained with other seeds) as one
    inner loop for evaluation: `evaluate`, the protocols and Lake's runs score it as they score one ProtoNet.

    Each member makes its prototypes from the support. A query's logits are minus the sum over members of its
    squared distances, each member's divided by their mean over the task's queries and present classes (members
    trained apart embed at different scales, so each counts alike; a task-level constant per member, so a member
    alone answers as it does without the ensemble). Classes without a support example keep the lowest logit.
    Evaluation only: its `meta` argument is the `ensemble_meta` of the members and no meta-gradient flows to it.
    Its meta-test loss is the cross-entropy of these logits, on another scale than one ProtoNet's: compare
    accuracies.

    Args:
      members: the members' loops (`PrototypeLoop`s, the same number of classes) and their meta-parameters
        (`MetaParams` with an "init" slot: the trained embedding).

    Raises:
      ValueError: no member, a member that is not a ProtoNet, or members with different `n_way`.
    """

    def __init__(self, members: Sequence[tuple[PrototypeLoop, MetaParams]]):
        loops = [loop for loop, _ in members]
        if not loops or not all(isinstance(loop, PrototypeLoop) for loop in loops):
            raise ValueError(f"ProtoNetEnsemble: members must be one or more PrototypeLoops (ProtoNets), got "
                             f"{[type(loop).__name__ for loop in loops]}")
        if len({loop.n_way for loop in loops}) > 1:
            raise ValueError(f"ProtoNetEnsemble: members answer different numbers of classes "
                             f"{[loop.n_way for loop in loops]}")
        first = loops[0]
        super().__init__(first.model, first.optimizer, first.loss_fn, first.outer_loss_fn)
        self.members = list(members)
        self.n_way = first.n_way

    def __repr__(self) -> str:
        return f"ProtoNetEnsemble({len(self.members)} x {type(self.model).__name__}, n_way={self.n_way})"

    def with_n_way(self, n_way: int) -> "ProtoNetEnsemble":
        """The same members answering `n_way` classes (each loop's `with_n_way`; the meta-parameters shared)."""
        return ProtoNetEnsemble([(loop.with_n_way(n_way), meta) for loop, meta in self.members])

    def with_support_tuning(self, tuning: SupportTuning | None) -> "ProtoNetEnsemble":
        """Every member fine-tuning its own embedding on each task's support (`PrototypeLoop.with_support_tuning`)."""
        return ProtoNetEnsemble([(loop.with_support_tuning(tuning), meta) for loop, meta in self.members])

    def check(self, meta: MetaParams) -> None:
        for loop, member in self.members:
            loop.check(member)

    def hyper(self, meta: MetaParams) -> Hyper:
        return {}

    def init(self, meta: MetaParams, start: Params | None = None) -> Any:  # type: ignore[override]
        """Each member's state at step 0 (a tuple, one per member); `meta` is unused (each member has its own)."""
        return tuple(loop.init(member, start) for loop, member in self.members)

    def step(self, state: Any, batch: Batch, meta: MetaParams, *,  # type: ignore[override]
             create_graph: bool = True, hyper: Hyper | None = None) -> Any:
        return tuple(loop.step(s, batch, member, create_graph=create_graph)
                     for (loop, member), s in zip(self.members, state))

    def predict(self, state: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        """Logits [n, n_way]: minus the members' mean-normalized squared distances, summed (see the class)."""
        total: Tensor | None = None
        for (loop, _), s in zip(self.members, state):
            present = s.opt_state.present                                  # [N] bool
            distances = -loop.predict(s, x).masked_fill(~present, 0.0)     # [n, N], 0 for absent classes
            scale = distances.sum() / (present.sum() * distances.shape[0]).clamp_min(1)
            normalized = distances / scale.clamp_min(torch.finfo(distances.dtype).tiny)
            total = normalized if total is None else total + normalized
        assert total is not None
        return (-total).masked_fill(~present, torch.finfo(total.dtype).min)
