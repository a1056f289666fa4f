"""A meta-learned L2 regularizer: weight decay strengths as meta-parameters."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from metaopt.metaparams.base import AbstractLossMetaParam, param_key
from metaopt.types import Batch, LossFn, Params

__all__ = ["WeightDecay"]


class WeightDecay(AbstractLossMetaParam):
    """Inner loss = task loss + sum_k exp(log_decay_k) / 2 ||params_k||^2 (slot "loss").

    The decay is learned in log space, so it stays positive (the inner problem
    stays strongly convex for a convex task loss). The textbook hyperparameter for
    implicit differentiation (Pedregosa 2016; Lorraine et al. 2020): it enters the
    inner stationarity condition directly.

    Args:
      model: the inner model (its parameter names).
      init: initial decay strength (> 0).
      granularity: "scalar" (one strength) or "tensor" (one per parameter tensor).
    """

    def __init__(self, model: nn.Module, init: float = 1e-3, granularity: Literal["scalar", "tensor"] = "tensor"):
        super().__init__()
        if init <= 0:
            raise ValueError(f"WeightDecay: init must be > 0, got {init}")
        if granularity not in ("scalar", "tensor"):
            raise ValueError(f"WeightDecay: granularity must be 'scalar' or 'tensor', got {granularity!r}")
        self.granularity = granularity
        dtype = next(model.parameters()).dtype
        start = torch.tensor(float(init), dtype=dtype).log()
        if granularity == "scalar":
            self.log_decay = nn.Parameter(start.clone())
        else:
            self.log_decays = nn.ParameterDict(
                {param_key(n): nn.Parameter(start.clone()) for n, _ in model.named_parameters()})

    def decay(self, name: str) -> Tensor:
        """The decay strength of parameter `name`."""
        log = self.log_decay if self.granularity == "scalar" else self.log_decays[param_key(name)]
        return log.exp()

    def inner_loss(self, pred: Tensor, batch: Batch, params: Params, base_loss: LossFn) -> Tensor:
        penalty = sum(0.5 * self.decay(k) * (p ** 2).sum() for k, p in params.items())
        return base_loss(pred, batch.y) + penalty


