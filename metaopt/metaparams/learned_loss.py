"""A learned inner loss: a small network scoring each training example (ML3, Bechtle et al. 2021)."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.metaparams.base import AbstractLossMetaParam
from metaopt.types import Batch, LossFn, Params

__all__ = ["LearnedLoss"]

Target = Literal["regression", "classification"]
Mode = Literal["add", "replace"]


class LearnedLoss(AbstractLossMetaParam):
    """Inner loss from a network of (prediction, target[, input]) per example (slot "loss").

    Per example, the features are the prediction (classification: softmax probabilities),
    the target (classification: one-hot) and, with `input_features`, the flattened input;
    an MLP maps them to one number. "add": inner loss = task loss + mean of the network's
    output, whose last layer starts at zero, so meta-training starts from plain MAML and
    learns a correction (task-adaptive losses, Baik et al. 2021). "replace": inner loss =
    mean softplus(network) alone (ML3's learned loss from scratch).

    Args:
      model: the inner model (its dtype).
      pred_features: size of one prediction (regression outputs or number of classes).
      target: "regression" (targets the size of a prediction) or "classification" (integer labels).
      input_features: size of one flattened input to include, or 0 to leave inputs out.
      hidden: hidden layer sizes.
      mode: "add" or "replace".
    """

    def __init__(self, model: nn.Module, pred_features: int, target: Target = "regression",
                 input_features: int = 0, hidden: Sequence[int] = (40, 40), mode: Mode = "add"):
        super().__init__()
        if target not in ("regression", "classification"):
            raise ValueError(f"LearnedLoss: target must be 'regression' or 'classification', got {target!r}")
        if mode not in ("add", "replace"):
            raise ValueError(f"LearnedLoss: mode must be 'add' or 'replace', got {mode!r}")
        if pred_features < 1 or input_features < 0:
            raise ValueError(f"LearnedLoss: need pred_features >= 1 and input_features >= 0, "
                             f"got {pred_features}, {input_features}")
        dtype = next(model.parameters()).dtype
        self.pred_features, self.target, self.input_features, self.mode = pred_features, target, input_features, mode
        sizes = [2 * pred_features + input_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b, dtype=dtype), nn.ReLU()]
        last = nn.Linear(sizes[-1], 1, dtype=dtype)
        if mode == "add":
            with torch.no_grad():
                last.weight.zero_()
                last.bias.zero_()
        self.net = nn.Sequential(*layers, last)

    def extra_repr(self) -> str:
        return f"target={self.target!r}, input_features={self.input_features}, mode={self.mode!r}"

    def features(self, pred: Tensor, batch: Batch) -> Tensor:
        """Per-example features [n, 2 * pred_features + input_features]."""
        n = pred.shape[0]
        if self.target == "classification":
            classes = torch.arange(self.pred_features, device=pred.device)
            parts = [pred.softmax(-1), (batch.y.unsqueeze(-1) == classes).to(pred.dtype)]  # one-hot, vmap-safe
        else:
            parts = [pred.reshape(n, -1), batch.y.reshape(n, -1).to(pred.dtype)]
        if self.input_features:
            parts.append(batch.x.reshape(n, -1).to(pred.dtype))
        feats = torch.cat(parts, dim=-1)
        expected = 2 * self.pred_features + self.input_features
        if feats.shape[-1] != expected:
            raise ValueError(f"LearnedLoss: got {feats.shape[-1]} features per example, built for {expected} "
                             f"(pred_features={self.pred_features}, input_features={self.input_features})")
        return feats

    def inner_loss(self, pred: Tensor, batch: Batch, params: Params, base_loss: LossFn) -> Tensor:
        learned = self.net(self.features(pred, batch)).squeeze(-1)
        if self.mode == "add":
            return base_loss(pred, batch.y) + learned.mean()
        return F.softplus(learned).mean()
