"""Meta-learned inner learning rates: one scalar, one per tensor, or one per element."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from metaopt.metaparams.base import AbstractOptimizerMetaParam, param_key, param_name
from metaopt.types import Hyper

__all__ = ["LearningRates"]

Granularity = Literal["scalar", "tensor", "element"]


class LearningRates(AbstractOptimizerMetaParam):
    """Fills the inner optimizer's `lr` with meta-parameters (slot "optimizer").

    "element" is Meta-SGD (Li et al. 2017: one rate per parameter element, which
    also learns the update direction since rates may turn negative); "tensor" is
    CS330 HW2's `learn_inner_lrs` (one rate per parameter tensor); "scalar" is a
    single learned rate (hyperparameter optimization, Maclaurin et al. 2015).

    Args:
      model: the inner model (its parameter names and shapes).
      init: the initial rate, or (low, high) to draw each rate uniformly at random
        (Li et al. 2017 draw from [0.005, 0.1]).
      granularity: "scalar", "tensor" or "element".
      generator: random source for a (low, high) init.
    """

    def __init__(self, model: nn.Module, init: float | Sequence[float] = 0.01,
                 granularity: Granularity = "tensor", generator: torch.Generator | None = None):
        super().__init__()
        if granularity not in ("scalar", "tensor", "element"):
            raise ValueError(f"LearningRates: granularity must be 'scalar', 'tensor' or 'element', "
                             f"got {granularity!r}")
        self.granularity = granularity
        shapes = {n: p.shape for n, p in model.named_parameters()}
        dtype = next(model.parameters()).dtype

        def initial(shape: torch.Size) -> torch.Tensor:
            if isinstance(init, (int, float)):
                return torch.full(shape, float(init), dtype=dtype)
            low, high = init
            return torch.empty(shape, dtype=dtype).uniform_(low, high, generator=generator)

        if granularity == "scalar":
            self.lr = nn.Parameter(initial(torch.Size()))
        else:
            self.lrs = nn.ParameterDict({
                param_key(n): nn.Parameter(initial(s if granularity == "element" else torch.Size()))
                for n, s in shapes.items()})

    def hyper(self) -> Hyper:
        if self.granularity == "scalar":
            return {"lr": self.lr}
        return {"lr": {param_name(k): v for k, v in self.lrs.items()}}
