"""Handwritten digits (scikit-learn's `load_digits`: 1797 images of 8x8, 10 classes), as tasks.

A real dataset that ships inside scikit-learn, so nothing downloads. Used by dataset
distillation (train a fresh model on a few images, test on held-out digits) and by
learned optimizers (train a small model on a stream of minibatches).
"""
from __future__ import annotations

from typing import Literal

import torch

from metaopt import losses
from metaopt.tasks.base import TaskDistribution
from metaopt.types import Batch, LossFn, Task

__all__ = ["Digits", "load_digits_split"]

Split = Literal["train", "test"]


def load_digits_split(split: Split, test_fraction: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 64] scaled to [0, 1] and labels [n] of one split, stratified by class and fixed by `seed`.

    Raises:
      ImportError: scikit-learn is not installed.
      ValueError: an unknown split or a test fraction outside (0, 1).
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits: split must be 'train' or 'test', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits tasks need scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.get_default_dtype()) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(10):
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(test_fraction * len(idx)))
        keep.append(idx[:n_test] if split == "test" else idx[n_test:])
    index = torch.cat(keep).sort().values
    return x[index], y[index]


class Digits(TaskDistribution):
    """10-way digit classification tasks: a support set to train on, a query set to score.

    Support batches hold `k_shot` random images per class from the train split; with
    `resample_support` every inner step gets its own batch (minibatch SGD, for learned
    optimizers), otherwise one batch is reused at every step (few-shot learning).
    The query holds `k_query` images per class from `query_split` ("test": generalisation
    to unseen digits; "train": the training loss, an optimizer's own objective).
    With `permute_pixels`, each task applies its own random pixel permutation to all its
    images: a family of distinct problems of equal difficulty ("permuted digits").

    Args:
      k_shot, k_query: support and query images per class (at most the smallest class of the split).
      query_split: "train" or "test".
      resample_support: a fresh support batch per inner step.
      permute_pixels: a random pixel permutation per task.
      flat: inputs [n, 64] (True) or images [n, 1, 8, 8].
      test_fraction, seed: the fixed train/test split.
    """

    kind = "classification"

    def __init__(self, k_shot: int = 1, k_query: int = 10, query_split: Split = "test",
                 resample_support: bool = False, permute_pixels: bool = False, flat: bool = True,
                 test_fraction: float = 0.3, seed: int = 0):
        self.train_x, self.train_y = load_digits_split("train", test_fraction, seed)
        self.query_x, self.query_y = load_digits_split(query_split, test_fraction, seed)
        for name, (ys, need) in {"train": (self.train_y, k_shot), query_split: (self.query_y, k_query)}.items():
            smallest = int(torch.bincount(ys, minlength=10).min())
            if need < 1 or need > smallest:
                raise ValueError(f"digits: {need} images per class requested from the {name} split, which has "
                                 f"{smallest} in its smallest class (need 1..{smallest})")
        self.k_shot, self.k_query, self.query_split = k_shot, k_query, query_split
        self.resample_support, self.permute_pixels, self.flat = resample_support, permute_pixels, flat
        self._train_index = [torch.nonzero(self.train_y == c).squeeze(1) for c in range(10)]
        self._query_index = [torch.nonzero(self.query_y == c).squeeze(1) for c in range(10)]

    def __repr__(self) -> str:
        return (f"Digits(10-way {self.k_shot}-shot, {self.k_query} {self.query_split} queries per class"
                f"{', permuted pixels' if self.permute_pixels else ''})")

    @property
    def loss_fn(self) -> LossFn:
        return losses.cross_entropy

    def _draw(self, x: torch.Tensor, y: torch.Tensor, index: list[torch.Tensor], per_class: int, n_tasks: int,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        picks = [torch.stack([idx[torch.randperm(len(idx), generator=g)[:per_class]] for idx in index]).reshape(-1)
                 for _ in range(n_tasks)]
        chosen = torch.stack(picks)  # [B, 10 * per_class], classes in order
        return x[chosen], y[chosen]

    def sample(self, n_tasks: int, inner_steps: int, generator: torch.Generator) -> Task:
        perms = (torch.stack([torch.randperm(64, generator=generator) for _ in range(n_tasks)])
                 if self.permute_pixels else None)

        def shape(x: torch.Tensor) -> torch.Tensor:
            if perms is not None:
                x = torch.gather(x, 2, perms.unsqueeze(1).expand_as(x))
            return x if self.flat else x.reshape(*x.shape[:2], 1, 8, 8)

        def support_batch() -> Batch:
            x, y = self._draw(self.train_x, self.train_y, self._train_index, self.k_shot, n_tasks, generator)
            return Batch(shape(x), y)

        if self.resample_support:
            support = tuple(support_batch() for _ in range(inner_steps))
        else:
            support = (support_batch(),) * inner_steps
        qx, qy = self._draw(self.query_x, self.query_y, self._query_index, self.k_query, n_tasks, generator)
        return Task(support=support, query=Batch(shape(qx), qy))
