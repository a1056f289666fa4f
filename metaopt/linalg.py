"""Matrix-free linear solvers on dicts of tensors, for implicit differentiation.

Both run a fixed number of iterations (no data-dependent stopping), so they run
unchanged under `torch.func.vmap`; the caller reports the residual. With `batched=True`
every tensor carries a leading task axis [B, ...] and the solvers solve B independent
systems at once (a stacked chunk of tasks, `metaopt.stacked`): inner products, step sizes
and residuals are per task, [B].
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metaopt.types import Params

__all__ = ["conjugate_gradient", "neumann", "relative_residual", "entry_sum"]

MatVec = Callable[[Params], Params]


def entry_sum(tensors: Params, batched: bool = False) -> Tensor:
    """The sum of every entry of every tensor: a scalar, or per task ([B]) when `batched` (each tensor [B, ...])."""
    if batched:
        return torch.stack([t.flatten(1).sum(1) for t in tensors.values()]).sum(0)
    return torch.stack([t.sum() for t in tensors.values()]).sum()


def _dot(a: Params, b: Params, batched: bool = False) -> Tensor:
    """<a, b> over every entry: a scalar, or per task ([B]) when `batched`."""
    return entry_sum({k: a[k] * b[k] for k in a}, batched)


def _per_entry(scale: Tensor, like: Tensor) -> Tensor:
    """A per-task scale [B] shaped to broadcast against [B, ...] (a scalar as it is)."""
    return scale.reshape(*scale.shape, *(1,) * (like.dim() - scale.dim())) if scale.dim() else scale


def conjugate_gradient(matvec: MatVec, b: Params, iters: int = 20, batched: bool = False) -> Params:
    """Solve A x = b for symmetric positive definite A, given only x -> A x.

    Exact after n iterations for an n x n system in exact arithmetic; each
    iteration costs one matrix-vector product (one Hessian-vector product).
    `batched`: B block-diagonal systems on the leading axis, each with its own step sizes.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = _dot(r, r, batched)
    for _ in range(iters):
        ap = matvec(p)
        curvature = _dot(p, ap, batched)
        # Stop moving (alpha = 0) once converged (rs = 0) or on non-positive curvature (A not
        # positive definite there): x stays finite and the caller's residual shows the failure.
        ok = curvature > 0
        alpha = torch.where(ok, rs / torch.where(ok, curvature, 1.0), 0.0)
        x = {k: x[k] + _per_entry(alpha, p[k]) * p[k] for k in x}
        r = {k: r[k] - _per_entry(alpha, ap[k]) * ap[k] for k in r}
        rs_new = _dot(r, r, batched)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        p = {k: r[k] + _per_entry(beta, p[k]) * p[k] for k in r}
        rs = rs_new
    return x


def neumann(matvec: MatVec, b: Params, iters: int = 50, alpha: float = 0.1) -> Params:
    """Approximate A^{-1} b by the truncated Neumann series alpha * sum_i (I - alpha A)^i b.

    Converges when the eigenvalues of A lie in (0, 2 / alpha); cheaper per
    iteration than CG but slower to converge (Lorraine et al. 2020).
    """
    term = dict(b)
    total = dict(b)
    for _ in range(iters):
        a_term = matvec(term)
        term = {k: term[k] - alpha * a_term[k] for k in term}
        total = {k: total[k] + term[k] for k in total}
    return {k: alpha * v for k, v in total.items()}


def relative_residual(matvec: MatVec, x: Params, b: Params, batched: bool = False) -> Tensor:
    """||A x - b|| / ||b|| (per task, [B], when `batched`)."""
    ax = matvec(x)
    error = {k: ax[k] - b[k] for k in b}
    return torch.sqrt(_dot(error, error, batched) /
                      _dot(b, b, batched).clamp_min(torch.finfo(ax[next(iter(ax))].dtype).tiny))
