"""Image augmentations for task samplers (no gradient flows through them).

`shifted`, `warped` and `elastic` (training) take images [..., H, W] (any leading shape, e.g.
[tasks, N, K + Q, 1, H, W])
and a generator, and draw one transformation per image, so a seeded sampler stays reproducible. The draws come
from the (CPU) generator and the images are transformed where they are: the same images on every device.
`shifted_views` (test time) draws nothing: fixed one-pixel shifts of every image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metaopt.types import Batch

__all__ = ["shifted", "random_affine", "affine", "warped", "elastic", "shifted_views", "with_views", "pooled_views",
           "VIEW_OFFSETS"]

#: The (rows, columns) offsets of `shifted_views`, nearest first: the image itself, then its 4 and 4 diagonal
#: one-pixel neighbours.
VIEW_OFFSETS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


def shifted(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image [..., H, W] moved by its own random whole-pixel offset in [-shift, shift]^2 (zeros shifted
    in). Exact: no resampling."""
    *lead, height, width = x.shape
    flat = F.pad(x.reshape(-1, height, width), (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (flat.shape[0], 2), generator=generator).to(x.device)
    rows = (offsets[:, :1] + torch.arange(height, device=x.device)).unsqueeze(2)          # [n, H, 1]
    cols = (offsets[:, 1:] + torch.arange(width, device=x.device)).unsqueeze(1)           # [n, 1, W]
    return flat[torch.arange(flat.shape[0], device=x.device).view(-1, 1, 1), rows, cols].reshape(*lead, height, width)


def random_affine(n: int, degrees: float, shear: float, scale: float, generator: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`n` random affine maps about the image centre (Koch et al. 2015's distortions for Omniglot), as
    `F.affine_grid` thetas [n, 2, 3] (output coordinates to input ones, so the inverse of each distortion): a
    rotation by U(-degrees, degrees) degrees, a shear with both factors in U(-shear, shear), and a scaling of each
    axis by U(1 - scale, 1 + scale); no translation. Draws [n, 5] uniforms from `generator`."""
    u = torch.rand((n, 5), generator=generator, dtype=dtype) * 2 - 1   # U(-1, 1)
    angle = u[:, 0] * math.radians(degrees)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)      # [n, 2, 2]
    shearing = torch.eye(2, dtype=dtype).repeat(n, 1, 1)
    shearing[:, 0, 1], shearing[:, 1, 0] = u[:, 1] * shear, u[:, 2] * shear
    scaling = torch.diag_embed(1 + u[:, 3:5] * scale)
    linear = torch.linalg.inv(rotation @ shearing @ scaling)
    return torch.cat([linear, torch.zeros(n, 2, 1, dtype=dtype)], dim=2)


def affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Images x [n, C, H, W] each resampled under its affine map theta [n, 2, 3] (`F.affine_grid`'s convention,
    normalized coordinates: a translation of 2 / W is one pixel); bilinear, zeros outside. Vmaps over a task axis
    of `x` with `theta` shared."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warped(x: torch.Tensor, degrees: float, shear: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Each image [..., H, W] under its own `random_affine` map (Koch et al. 2015's distortions); bilinear
    resampling with zeros outside. All zero: `x` itself."""
    if not (degrees or shear or scale):
        return x
    *lead, height, width = x.shape
    flat = x.reshape(-1, 1, height, width)
    return affine(flat, random_affine(flat.shape[0], degrees, shear, scale, generator, x.dtype)).reshape(x.shape)


def elastic(x: torch.Tensor, pixels: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Each image [..., H, W] under its own smooth random displacement field (Simard et al. 2003's elastic
    distortions, the local wobble of one person's strokes against another's): uniform noise in each axis, smoothed
    by a Gaussian of `sigma` pixels, scaled to an rms displacement of `pixels` pixels per image and axis; bilinear
    resampling with zeros outside. Draws [n, 2, H, W] uniforms from `generator`. `pixels` 0: `x` itself."""
    if not pixels:
        return x
    *lead, height, width = x.shape
    flat = x.reshape(-1, 1, height, width)
    n = flat.shape[0]
    noise = (torch.rand((n, 2, height, width), generator=generator, dtype=x.dtype) * 2 - 1).to(x.device)
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    field = F.conv2d(noise, kernel.view(1, 1, 1, -1).expand(2, 1, 1, -1), padding=(0, radius), groups=2)
    field = F.conv2d(field, kernel.view(1, 1, -1, 1).expand(2, 1, -1, 1), padding=(radius, 0), groups=2)
    rms = field.pow(2).mean(dim=(2, 3), keepdim=True).sqrt().clamp_min(torch.finfo(x.dtype).tiny)
    field = field / rms * pixels                                                          # [n, 2, H, W] pixels
    identity = torch.eye(2, 3, dtype=x.dtype, device=x.device).expand(n, 2, 3)
    grid = F.affine_grid(identity, [n, 1, height, width], align_corners=False)           # [n, H, W, 2] (x, y)
    grid = grid + field.permute(0, 2, 3, 1) * torch.tensor([2 / width, 2 / height], dtype=x.dtype, device=x.device)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(x.shape)


def shifted_views(x: torch.Tensor, views: int) -> torch.Tensor:
    """Images [..., H, W] and their one-pixel shifts: [views, ..., H, W], view v moved by `VIEW_OFFSETS[v]`
    (down and right positive; zeros shifted in; view 0 is `x`). Deterministic and exact (no resampling): for
    test-time augmentation, e.g. a ProtoNet's prototype as the mean embedding of its support image's views."""
    if not 1 <= views <= len(VIEW_OFFSETS):
        raise ValueError(f"shifted_views: views must be between 1 and {len(VIEW_OFFSETS)}, got {views}")
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return torch.stack([padded[..., 1 - dy:1 - dy + height, 1 - dx:1 - dx + width]
                        for dy, dx in VIEW_OFFSETS[:views]])


def with_views(batch: Batch, views: int) -> Batch:
    """A batch with every image's `shifted_views`: x [..., n, C, H, W] -> [..., views * n, C, H, W] view by
    view (the first n are the images themselves), y [..., n] -> [..., views * n] repeated alike. Of a support, a
    ProtoNet's prototype becomes the mean embedding of a support image's views and MAML adapts on all of them; of
    a query, `pooled_views` averages each query's predictions over its views."""
    x = shifted_views(batch.x, views).movedim(0, -5).flatten(-5, -4)
    return Batch(x, batch.y.repeat(*([1] * (batch.y.dim() - 1)), views))


def pooled_views(pred: torch.Tensor, y: torch.Tensor, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions for queries with views (`with_views`: view by view) averaged over each query's views:
    pred [..., views * n, C] -> [..., n, C] and labels y [..., views * n] -> [..., n] (view 0's, the images
    themselves). Exact for a ProtoNet: its logits are minus squared distances, whose mean over views is minus the
    squared distance from the views' mean embedding plus a term equal for every class, so the answers and the
    softmax equal those of the mean embedding. `views=1`: `pred` and `y` themselves."""
    if views == 1:
        return pred, y
    if y.shape[-1] % views or pred.shape[-2] != y.shape[-1]:
        raise ValueError(f"pooled_views: {views} views of each query need labels [..., views * n] and predictions "
                         f"[..., views * n, C], got {list(y.shape)} and {list(pred.shape)}")
    n = y.shape[-1] // views
    return pred.unflatten(-2, (views, n)).mean(-3), y[..., :n]
