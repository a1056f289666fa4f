"""Learned differentiable augmentation of the support set (slot "data")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.metaparams.base import AbstractDataMetaParam
from metaopt.types import Batch

__all__ = ["LearnedAffineAugmentation"]


class LearnedAffineAugmentation(AbstractDataMetaParam):
    """Adds `copies` learned affine warps of every support image to the support set.

    Copy j of image x is `grid_sample(x, affine_grid(I + delta_j))` (bilinear, zero
    padding) with a learned 2x3 offset delta_j from the identity, plus a learned
    brightness offset, so the meta-gradient reaches the warps through the interpolation.
    The warps are deterministic (drawn once, at construction, as small random offsets so
    the copies differ, then learned): recomputing a step (checkpointing) or evaluating an
    antithetic ES pair sees the same augmentation. The support set grows from n to
    n * (1 + copies) examples with the labels repeated.

    Args:
      model: the inner model (its dtype).
      copies: augmented copies per support image.
      init_std: standard deviation of the initial warp offsets.
      seed: the random source of the initial offsets.
    """

    def __init__(self, model: nn.Module, copies: int = 2, init_std: float = 0.05, seed: int = 0):
        super().__init__()
        if copies < 1:
            raise ValueError(f"LearnedAffineAugmentation: copies must be >= 1, got {copies}")
        dtype = next(model.parameters()).dtype
        g = torch.Generator().manual_seed(seed)
        self.copies = copies
        self.delta = nn.Parameter(init_std * torch.randn(copies, 2, 3, generator=g).to(dtype))
        self.brightness = nn.Parameter(torch.zeros(copies, dtype=dtype))

    def extra_repr(self) -> str:
        return f"copies={self.copies}"

    def warps(self) -> Tensor:
        """The affine matrices [copies, 2, 3] (identity + learned offset)."""
        eye = torch.eye(2, 3, dtype=self.delta.dtype, device=self.delta.device)
        return eye + self.delta

    def transform(self, batch: Batch) -> Batch:
        x = batch.x
        if x.dim() != 4:
            raise ValueError(f"LearnedAffineAugmentation needs images [n, C, H, W], got inputs of shape "
                             f"{tuple(x.shape)}")
        n = x.shape[0]
        theta = self.warps().repeat_interleave(n, dim=0)  # [copies * n, 2, 3]
        images = x.repeat(self.copies, 1, 1, 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        warped = warped + self.brightness.repeat_interleave(n).view(-1, 1, 1, 1)
        return Batch(torch.cat([x, warped]), torch.cat([batch.y, batch.y.repeat(self.copies)]))
