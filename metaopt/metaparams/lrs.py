"""Meta-learned inner learning rates: one scalar, one per tensor, or one per element."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from metaopt.loop import adapt_patterns, adapted_names
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
      adapt: rates only for these parameters (module paths, as `InnerLoop(adapt=...)`: the ones the inner
        steps train; a held parameter's rate would never be read). None: every parameter.
    """

    def __init__(self, model: nn.Module, init: float | Sequence[float] = 0.01,
                 granularity: Granularity = "tensor", generator: torch.Generator | None = None,
                 adapt: Sequence[str] | None = None):
        super().__init__()
        if granularity not in ("scalar", "tensor", "element"):
            raise ValueError(f"LearningRates: granularity must be 'scalar', 'tensor' or 'element', "
                             f"got {granularity!r}")
        self.granularity = granularity
        shapes = {n: p.shape for n, p in model.named_parameters()}
        patterns = adapt_patterns(adapt)
        if patterns is not None:
            shapes = {n: shapes[n] for n in adapted_names(shapes, patterns)}
            if not shapes:
                raise ValueError(f"LearningRates: adapt={list(patterns)} names no parameter of "
                                 f"{type(model).__name__}")
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
