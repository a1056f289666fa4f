"""Evaluating a function of the meta-parameters at other values, without changing the module.

Used by the estimators that take directional derivatives (forward mode, ES, PES) and by the
compiled path (`metaopt.compiled`), which differentiates with respect to these values.
"""
from __future__ import annotations

from typing import Callable, TypeVar, cast

import torch
from torch import Tensor, nn

from metaopt.types import MetaParams

__all__ = ["MetaCall", "meta_values", "call_with_meta"]


class MetaCall(nn.Module):
    """`MetaCall(meta)(fn, *args) = fn(meta, *args)`: a module whose parameters are meta's (under "meta."),
    so `torch.func.functional_call` can replace them."""

    def __init__(self, meta: MetaParams):
        super().__init__()
        self.meta = meta

    def forward(self, fn: Callable[..., object], *args: object) -> object:
        return fn(self.meta, *args)


def meta_values(meta: MetaParams) -> dict[str, Tensor]:
    """The meta-parameters that require grad, detached: the point at which estimates are taken."""
    return {k: p.detach() for k, p in meta.named_parameters() if p.requires_grad}


R = TypeVar("R")


def call_with_meta(meta: MetaParams, values: dict[str, Tensor], fn: Callable[..., R], *args: object) -> R:
    """`fn(meta, *args)` with the meta-parameters replaced by `values` (keyed like named_parameters).

    Uses `torch.func.functional_call`, so it composes with jvp and vmap; the module is not changed.
    """
    return cast(R, torch.func.functional_call(MetaCall(meta), {f"meta.{k}": v for k, v in values.items()}, (fn, *args)))


