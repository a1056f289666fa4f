"""Small reference models. Ordinary `nn.Module`s: the inner loop calls them functionally."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "Conv4", "BatchNorm", "MatmulConv2d"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """A multilayer perceptron: Linear -> activation, repeated, then a Linear head.

    The sinusoid benchmark's model is `MLP(1, (40, 40), 1)` (Finn et al. 2017).

    Args:
      in_features: input size.
      hidden: hidden layer sizes.
      out_features: output size.
      activation: "relu", "tanh" or "gelu".
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1,
                 activation: Literal["relu", "tanh", "gelu"] = "relu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MLP: unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x: [n, in_features] -> [n, out_features]."""
        return self.net(x)


class BatchNorm(nn.Module):
    """Batch normalization over every dimension but dim 1 (channels), from primitive ops.

    Same outputs and running statistics as `nn.BatchNorm1d/2d/3d` (float64 tests
    check it), but its second derivatives are exact under `torch.func.vmap`, where
    PyTorch's fused batch_norm kernel is not (functorch issue #534), so MAML over a
    vmapped batch of tasks stays correct and fast.

    Args:
      num_features: channels C of an input [n, C, ...].
      eps: added to the variance.
      momentum: running-statistics update rate.
      affine: learn a per-channel scale and shift.
      track_running_stats: keep running mean/variance buffers (used in eval mode).
    """

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = False):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        """x: [n, C, *spatial] -> same shape."""
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training or not self.track_running_stats:
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
            if self.training and self.track_running_stats:
                with torch.no_grad():  # running statistics never carry gradients
                    n = x.numel() // x.shape[1]
                    unbiased = var.detach().reshape(-1) * (n / max(n - 1, 1))
                    self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach().reshape(-1))
                    self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
                    self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean.view(shape), self.running_var.view(shape)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


_PATCH_INDICES: dict[tuple, Tensor] = {}


def _patch_index(out_h: int, out_w: int, padded_width: int, kernel: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int], device: torch.device) -> Tensor:
    """The flat padded-pixel index of every (output row, output column, kernel row, kernel column), [H'*W'*kh*kw]
    int64: computed once per geometry and device in eager mode (the inner step calls it at every forward), traced
    (constants) under torch.compile."""
    key = (out_h, out_w, padded_width, kernel, stride, dilation, device)
    index = None if torch.compiler.is_compiling() else _PATCH_INDICES.get(key)
    if index is None:
        rows_at = torch.arange(out_h, device=device).view(-1, 1, 1, 1) * stride[0] + \
            torch.arange(kernel[0], device=device).view(1, 1, -1, 1) * dilation[0]
        cols_at = torch.arange(out_w, device=device).view(1, -1, 1, 1) * stride[1] + \
            torch.arange(kernel[1], device=device).view(1, 1, 1, -1) * dilation[1]
        index = (rows_at * padded_width + cols_at).reshape(-1)
        if not torch.compiler.is_compiling():
            _PATCH_INDICES[key] = index
    return index


class MatmulConv2d(nn.Conv2d):
    """`nn.Conv2d` computed as one matrix product: the input's patches (im2col) as rows,
    [n*H'*W', kh*kw*C], times the weight as a [kh*kw*C, out] matrix.

    The same function as `nn.Conv2d` (float64 tests check outputs and meta-gradients), for other kernels:
    with per-task weights (vmap, `metaopt.stacked`), PyTorch runs an ordinary convolution as one *grouped*
    convolution over the tasks, whose backward and double backward are slow on cuDNN for small per-task
    filters; as a product it is one batched GEMM per layer, and its derivatives are GEMMs with an inner
    dimension of n*H'*W' (no per-example intermediate) and the patches' scatter-add. The patches
    cost C*kh*kw floats per output pixel (9x the input for a 3x3 filter). The output is channels-last in
    memory (an NCHW view of [n, H', W', out]). `groups=1` and numeric zero padding only.
    """

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(f"MatmulConv2d: groups = {self.groups}, padding = {self.padding!r}, padding_mode = "
                             f"{self.padding_mode!r}: only groups=1 and numeric zero padding")

    def patch_rows(self, x: Tensor) -> tuple[Tensor, int, int]:
        """x: [n, C, H, W] -> (rows [n*H'*W', kh*kw*C], H', W'): every output pixel's receptive field, in
        (kh, kw, C) order (`rows_weight`'s). One gather from the padded input in channels-last order (its
        derivatives an `index_put` with accumulation and a gather again, with vmap batching rules): a fixed
        number of kernels whatever n (`F.unfold` launches one per example on CUDA)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph, pw = (int(p) for p in self.padding)
        n, c, height, width = x.shape
        padded = nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # [n, H + 2ph, W + 2pw, C]
        out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        index = _patch_index(out_h, out_w, width + 2 * pw, (kh, kw), (sh, sw), (dh, dw), x.device)
        # Advanced indexing, not index_select: Inductor (torch 2.13, CPU) miscompiled index_select's derivatives
        # when two such layers follow each other under vmap (meta-gradients off by 20-95%; caught by
        # `Compiled`'s check against eager, tests/test_models.py).
        patches = padded.reshape(n, -1, c)[:, index]  # [n, H'*W'*kh*kw, C]
        return patches.reshape(n * out_h * out_w, kh * kw * c), out_h, out_w

    def rows_weight(self) -> Tensor:
        """The weight as a [kh*kw*C, out] matrix, rows in `patch_rows`' (kh, kw, C) order."""
        return self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1).t()

    def forward(self, x: Tensor) -> Tensor:
        """x: [n, in_channels, H, W] -> [n, out_channels, H', W'] (channels-last memory)."""
        rows, height, width = self.patch_rows(x)
        weight = self.rows_weight()
        y = rows @ weight if self.bias is None else torch.addmm(self.bias, rows, weight)
        return y.reshape(x.shape[0], height, width, self.out_channels).permute(0, 3, 1, 2)


class Conv4(nn.Module):
    """The four-block convolutional backbone of few-shot learning (Vinyals et al. 2016).

    Each block: conv 3x3 (`channels` filters, padding 1), BatchNorm, ReLU, max-pool 2 (the last
    `4 - pools` blocks without it). A 28x28 input ends as channels x 1 x 1 (pools=4); a linear head
    maps it to `out_features`.

    BatchNorm uses batch statistics, as MAML does (transductive: query batches are
    normalized with their own statistics); with `track_running_stats=True` its running
    statistics are buffers, which the inner loop carries as explicit state. By default it is
    `metaopt.models.BatchNorm`, exact under vmap at every order; `norm="fused"` uses PyTorch's
    `nn.BatchNorm2d` instead (the same function, ~1.5x faster on the CPU for the whole backbone,
    but its second derivatives are wrong under vmap, so second-order estimators then run its tasks
    one by one: for ProtoNets and first-order estimators, which never differentiate an inner gradient).

    Args:
      in_channels: image channels (1 for Omniglot).
      out_features: classes (N of N-way), or 0 for an embedding without head (ProtoNets).
      channels: filters per block.
      image_size: input height = width, to size the head.
      track_running_stats: keep BatchNorm running statistics as buffers.
      pools: how many blocks (the first ones) end in the max-pool: 4 is the standard backbone; 3 keeps the
        last block's 3x3 map at 28x28 (a 576-d embedding instead of 64-d, for the same convolutions).
      stem_stride: the first convolution's stride: 2 reads a 56x56 image into the 28x28 map the standard
        backbone starts from (the finer strokes for about the same arithmetic: only the first layer sees
        more pixels, and computes as many outputs).
      norm: "primitive" (`metaopt.models.BatchNorm`) or "fused" (`nn.BatchNorm2d`); see above.
      channels_last: store the convolution weights channels-last (NHWC): a memory layout, the same values
        (measured no faster for conv4 on one CPU thread: README, experiments/bench_conv4.py).
      conv: "native" (`nn.Conv2d`) or "matmul" (`MatmulConv2d`: im2col and one GEMM; the same function,
        for per-task weights on the GPU, where a grouped convolution's derivatives are slow: README).
    """

    def __init__(self, in_channels: int = 1, out_features: int = 5, channels: int = 64,
                 image_size: int = 28, track_running_stats: bool = False, pools: int = 4, stem_stride: int = 1,
                 norm: Literal["primitive", "fused"] = "primitive", channels_last: bool = False,
                 conv: Literal["native", "matmul"] = "native"):
        super().__init__()
        if conv not in ("native", "matmul"):
            raise ValueError(f"Conv4: conv = {conv!r} must be 'native' (nn.Conv2d) or 'matmul' (MatmulConv2d)")
        if norm not in ("primitive", "fused"):
            raise ValueError(f"Conv4: norm = {norm!r} must be 'primitive' (exact under vmap) or 'fused' "
                             "(nn.BatchNorm2d)")
        if stem_stride < 1:
            raise ValueError(f"Conv4: stem_stride = {stem_stride} must be at least 1")
        stem_size = (image_size - 1) // stem_stride + 1  # a 3x3 convolution with padding 1
        if not 0 <= pools <= 4 or stem_size >> pools < 1:
            raise ValueError(f"Conv4: pools = {pools} must be in 0..4 and leave image_size = {image_size} at "
                             f"least 1 pixel (image_size / stem_stride / 2**pools)")
        blocks: list[nn.Module] = []
        normalization = BatchNorm if norm == "primitive" else nn.BatchNorm2d
        convolution = nn.Conv2d if conv == "native" else MatmulConv2d
        c, size = in_channels, stem_size
        for block in range(4):
            pooled = block < pools
            blocks += [convolution(c, channels, 3, padding=1, stride=stem_stride if block == 0 else 1),
                       normalization(channels, track_running_stats=track_running_stats),
                       nn.ReLU()] + ([nn.MaxPool2d(2)] if pooled else [])
            c, size = channels, size // 2 if pooled else size
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.embedding_size = channels * max(size, 1) ** 2
        self.head = nn.Linear(self.embedding_size, out_features) if out_features else nn.Identity()
        for layer in (m for m in self.features if channels_last and isinstance(m, nn.Conv2d)):
            layer.weight.data = layer.weight.data.contiguous(memory_format=torch.channels_last)

    def forward(self, x: Tensor, embed: bool = False) -> Tensor:
        """x: [n, in_channels, image_size, image_size] -> [n, out_features] (or embeddings); with `embed=True`
        the embedding before the head, [n, embedding_size] (what `ClassifierLoop` makes prototypes of)."""
        features = self.features(x)
        return features if embed else self.head(features)
