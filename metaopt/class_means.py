"""Each class's mean embedding: the prototypes of ProtoNets (`metaopt.prototypes`) and of support tuning."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PrototypeState", "class_means"]


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
