"""The initialization as meta-parameters: MAML (Finn et al. 2017)."""
from __future__ import annotations

from torch import nn

from metaopt.metaparams.base import AbstractInitMetaParam, param_key, param_name
from metaopt.types import Params

__all__ = ["Init"]


class Init(AbstractInitMetaParam):
    """Meta-learned initial inner parameters (slot "init"; MAML, Finn et al. 2017).

    Starts from a copy of the model's current parameters; the model itself is
    never changed.

    Args:
      model: the inner model whose parameters are copied.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.params = nn.ParameterDict(
            {param_key(n): nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()})

    def initial_params(self) -> Params:
        return {param_name(k): v for k, v in self.params.items()}
