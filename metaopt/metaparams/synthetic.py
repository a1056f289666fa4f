"""Learned training sets: dataset distillation (Wang et al. 2018)."""
from __future__ import annotations

from typing import Sequence, cast

import torch
from torch import Tensor, nn

from metaopt.metaparams.base import AbstractDataMetaParam
from metaopt.types import Batch

__all__ = ["SyntheticData"]


class SyntheticData(AbstractDataMetaParam):
    """A learned support set that replaces the task's own (slot "data").

    `n_per_class` learned examples per class, initialized as Gaussian noise; with
    `learn_labels`, learned soft labels (logits, one distribution per example, starting
    at the one-hot class) instead of the fixed class labels. Every inner step trains
    on the whole synthetic set; pair with `LearningRates(granularity="scalar")` in the
    "optimizer" slot for Wang et al.'s learned step size, and with `RandomInit` tasks
    so the set trains fresh models from any random initialization.

    Args:
      model: the inner model (its dtype).
      shape: the shape of one input, e.g. [64] or [1, 8, 8].
      n_classes: number of classes, or 0 for regression: `n_per_class` examples with
        learned real-valued targets of `target_shape`.
      n_per_class: learned examples per class.
      learn_labels: learn soft labels too.
      init_std: standard deviation of the initial noise.
      label_sharpness: the initial soft-label logit of the true class (others 0).
    """

    def __init__(self, model: nn.Module, shape: Sequence[int], n_classes: int, n_per_class: int = 1,
                 learn_labels: bool = False, init_std: float = 1.0, label_sharpness: float = 5.0,
                 target_shape: Sequence[int] = (1,)):
        super().__init__()
        if n_classes == 1 or n_classes < 0 or n_per_class < 1:
            raise ValueError(f"SyntheticData: need n_classes >= 2 (or 0 for regression) and n_per_class >= 1, "
                             f"got {n_classes}, {n_per_class}")
        dtype = next(model.parameters()).dtype
        n = max(n_classes, 1) * n_per_class
        self.n_classes, self.n_per_class, self.learn_labels = n_classes, n_per_class, learn_labels
        self.x = nn.Parameter(init_std * torch.randn(n, *shape, dtype=dtype))
        if n_classes == 0:  # regression: the targets are always learned
            self.y = nn.Parameter(init_std * torch.randn(n, *target_shape, dtype=dtype))
            return
        labels = torch.arange(n_classes).repeat_interleave(n_per_class)
        self.register_buffer("labels", labels)
        if learn_labels:
            self.label_logits = nn.Parameter(label_sharpness * nn.functional.one_hot(labels, n_classes).to(dtype))

    def extra_repr(self) -> str:
        return f"{self.n_classes} classes x {self.n_per_class}, shape={tuple(self.x.shape[1:])}, " \
               f"learn_labels={self.learn_labels}"

    def targets(self) -> Tensor:
        """Class labels [n] (long), soft labels [n, n_classes] (rows sum to 1) when learned, or learned
        regression targets [n, *target_shape]."""
        if self.n_classes == 0:
            return self.y
        labels = cast(Tensor, self.labels)
        return self.label_logits.softmax(-1) if self.learn_labels else labels

    def transform(self, batch: Batch) -> Batch:
        # The task's support batch is ignored: the learned set is all the inner loop sees.
        return Batch(self.x, self.targets())
