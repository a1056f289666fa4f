"""Learned differentiable augmentation of the support set (slot "data")."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from metaopt.metaparams.base import AbstractDataMetaParam
from metaopt.types import Batch

__all__ = ["LearnedAffineAugmentation", "bilinear_sample"]


def _affine_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """F.affine_grid(theta, [n, C, height, width], align_corners=False) as one einsum.

    Written out because affine_grid's backward has no vmap batching rule (torch 2.13).
    theta [n, 2, 3] -> sampling grid [n, height, width, 2] in [-1, 1] coordinates.
    """
    xs = (2 * torch.arange(width, dtype=theta.dtype, device=theta.device) + 1) / width - 1
    ys = (2 * torch.arange(height, dtype=theta.dtype, device=theta.device) + 1) / height - 1
    base = torch.stack([xs.expand(height, width), ys.unsqueeze(1).expand(height, width),
                        torch.ones(height, width, dtype=theta.dtype, device=theta.device)], dim=-1)
    return torch.einsum("hwk,nck->nhwc", base, theta)


def bilinear_sample(images: Tensor, grid: Tensor) -> Tensor:
    """F.grid_sample(images, grid, "bilinear", padding_mode="zeros", align_corners=False), by gathers.

    Written out because grid_sample has no forward-mode derivative (torch 2.13), which the
    `forward` estimator needs; gathers and products have every derivative and vmap rule.
    images [n, C, H, W], grid [n, H', W', 2] (x, y in [-1, 1]) -> [n, C, H', W'].
    """
    n, c, h, w = images.shape
    x = ((grid[..., 0] + 1) * w - 1) / 2  # pixel coordinates, [n, H', W']
    y = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = torch.floor(x).detach(), torch.floor(y).detach()
    flat = images.reshape(n, c, h * w)
    out = images.new_zeros(n, c, *grid.shape[1:3])
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
            inside = ((xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)).to(images.dtype)
            index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().reshape(n, 1, -1).expand(n, c, -1)
            values = torch.gather(flat, 2, index).reshape(out.shape)
            out = out + (weight * inside).unsqueeze(1) * values
    return out


class LearnedAffineAugmentation(AbstractDataMetaParam):
    """Adds `copies` learned affine warps of every support image to the support set.

    Copy j of image x is `grid_sample(x, affine_grid(I + delta_j))` (bilinear, zero
    padding; both written out, see `bilinear_sample`) with a learned 2x3 offset
    delta_j from the identity, plus a learned brightness offset, so the meta-gradient
    reaches the warps through the interpolation.
    The warps are deterministic (drawn once, at construction, as small random offsets so
    the copies differ, then learned): recomputing a step (checkpointing) or evaluating an
    antithetic ES pair sees the same augmentation. The support set grows from n to
    n * (1 + copies) examples with the labels repeated.

    Args:
      model: the inner model (its dtype).
      copies: augmented copies per support image.
      init_std: standard deviation of the initial warp offsets.
      seed: the random source of the initial offsets.
      learn: False keeps the initial warps fixed (buffers, not meta-parameters): the ablation
        "a fixed set of random warps of the same size" against learned ones.
    """

    def __init__(self, model: nn.Module, copies: int = 2, init_std: float = 0.05, seed: int = 0,
                 learn: bool = True):
        super().__init__()
        if copies < 1:
            raise ValueError(f"LearnedAffineAugmentation: copies must be >= 1, got {copies}")
        dtype = next(model.parameters()).dtype
        g = torch.Generator().manual_seed(seed)
        self.copies, self.learn = copies, learn
        delta = init_std * torch.randn(copies, 2, 3, generator=g).to(dtype)
        brightness = torch.zeros(copies, dtype=dtype)
        if learn:
            self.delta, self.brightness = nn.Parameter(delta), nn.Parameter(brightness)
        else:
            self.register_buffer("delta", delta)
            self.register_buffer("brightness", brightness)

    def extra_repr(self) -> str:
        return f"copies={self.copies}" + ("" if self.learn else ", fixed")

    def warps(self) -> Tensor:
        """The affine matrices [copies, 2, 3] (identity + learned offset)."""
        eye = torch.eye(2, 3, dtype=self.delta.dtype, device=self.delta.device)
        return eye + self.delta

    def transform(self, batch: Batch) -> Batch:
        x = batch.x
        if x.dim() != 4:
            raise ValueError(f"LearnedAffineAugmentation needs images [n, C, H, W], got inputs of shape "
                             f"{tuple(x.shape)}")
        n, c, h, w = x.shape
        grid = _affine_grid(self.warps(), h, w)  # one grid per copy: [copies, h, w, 2]
        # All n images ride along as channels of one sample per copy, so each warp's
        # sampling positions and weights are computed once, not once per image.
        stacked = x.reshape(1, n * c, h, w).expand(self.copies, n * c, h, w)
        warped = bilinear_sample(stacked, grid).reshape(self.copies, n, c, h, w)
        warped = warped + self.brightness.view(-1, 1, 1, 1, 1)
        return Batch(torch.cat([x, warped.reshape(self.copies * n, c, h, w)]),
                     torch.cat([batch.y, batch.y.repeat(self.copies)]))
