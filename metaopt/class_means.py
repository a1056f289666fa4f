"""Each class's mean embedding and the logits against it: ProtoNets (`metaopt.prototypes`) and support tuning."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PrototypeState", "class_means", "prototype_logits"]


class PrototypeState(NamedTuple):
    """What a ProtoNet's inner step keeps (in the inner state's `opt_state`).

    Attributes:
      prototypes: [N, D] each class's mean support embedding (zeros for an absent class).
      present: [N] bool, whether the class had a support example.
    """

    prototypes: Tensor
    present: Tensor


def class_means(embeddings: Tensor, labels: Tensor, n_way: int) -> PrototypeState:
    """Each class's mean embedding: embeddings [n, D] and labels [n] in 0..n_way-1 -> prototypes [n_way, D]
    (zeros for a class with no example) and which classes had one, [n_way] bool. Differentiable in the
    embeddings; vmaps over tasks."""
    # not F.one_hot, which vmap refuses for labels that differ between tasks
    one_hot = (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).to(embeddings.dtype)  # [n, N]
    counts = one_hot.sum(0)                                                # [N]
    prototypes = one_hot.T @ embeddings / counts.clamp_min(1).unsqueeze(1)  # [N, D]
    return PrototypeState(prototypes, counts > 0)


def prototype_logits(embeddings: Tensor, state: PrototypeState) -> Tensor:
    """Logits [n, N] of embeddings [n, D]: minus the squared distance to each prototype; the dtype's lowest value for
    a class without a prototype (probability exactly 0)."""
    logits = -((embeddings.unsqueeze(1) - state.prototypes.unsqueeze(0)) ** 2).sum(-1)
    return logits.masked_fill(~state.present, torch.finfo(logits.dtype).min)
