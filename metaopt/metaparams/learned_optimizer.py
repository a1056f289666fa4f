"""A learned inner optimizer: one small network applied to every coordinate (Andrychowicz et al. 2016).

Coordinate-wise: the network sees one parameter entry at a time (its gradient and
momenta, preprocessed), with weights shared across all entries of all tensors, so its
size does not depend on the model's. Per-coordinate state (momenta; the LSTM's h and
c) lives in the inner optimizer state, so every estimator unrolls it unchanged.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence, cast

import torch
from torch import Tensor, nn

from metaopt.metaparams.base import AbstractOptimizerMetaParam
from metaopt.optim import InnerOptimizer
from metaopt.types import Hyper, OptState, Params

__all__ = ["LearnedOptimizer", "preprocess_log_sign"]

Architecture = Literal["lstm", "mlp"]


def preprocess_log_sign(x: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al.'s input scaling: x -> (log|x| / p, sign x) if |x| >= e^-p else (-1, e^p x).

    Maps values of any magnitude to two O(1) features. Shape [...] -> [..., 2].
    """
    small = x.abs() < math.exp(-p)
    magnitude = torch.where(small, -torch.ones_like(x), torch.log(x.abs().clamp_min(math.exp(-p))) / p)
    direction = torch.where(small, math.exp(p) * x, torch.sign(x))
    return torch.stack([magnitude, direction], dim=-1)


class LearnedOptimizer(AbstractOptimizerMetaParam):
    """A coordinate-wise learned update rule (slot "optimizer").

    Per coordinate, the features are the preprocessed gradient and momenta
    m_d <- d m_d + (1 - d) g for each decay d (2 features each, `preprocess_log_sign`).
    The network ("lstm": one LSTM cell with per-coordinate hidden state, then a linear
    read-out; "mlp": two hidden layers, stateless apart from the momenta) outputs one
    number per coordinate, and the update is

        p <- p - exp(log_base_lr) * g - exp(log_output_scale) * network(features).

    The read-out starts at zero, so before meta-training the rule is plain SGD with
    `base_lr` (None: no SGD term, the network alone); meta-training learns what to add.
    The rule ignores the loop's own `InnerOptimizer` and its hyperparameters.

    Args:
      model: the inner model (only its parameters' dtype is used: the rule's size is
        independent of the model's).
      architecture: "lstm" or "mlp".
      hidden: hidden units.
      decays: momentum decay rates used as features.
      base_lr: the initial learning rate of the SGD term (learned), or None for none.
      output_scale: the initial scale of the network's output (learned).
    """

    def __init__(self, model: nn.Module, architecture: Architecture = "lstm", hidden: int = 20,
                 decays: Sequence[float] = (0.5, 0.9, 0.99), base_lr: float | None = 0.1,
                 output_scale: float = 0.01):
        super().__init__()
        if architecture not in ("lstm", "mlp"):
            raise ValueError(f"LearnedOptimizer: architecture must be 'lstm' or 'mlp', got {architecture!r}")
        if hidden < 1 or not all(0 <= d < 1 for d in decays):
            raise ValueError(f"LearnedOptimizer: need hidden >= 1 and decays in [0, 1); got {hidden}, {decays}")
        if (base_lr is not None and base_lr <= 0) or output_scale <= 0:
            raise ValueError(f"LearnedOptimizer: base_lr and output_scale must be > 0, got {base_lr}, {output_scale}")
        dtype = next(model.parameters()).dtype
        self.architecture, self.hidden, self.decays = architecture, hidden, tuple(decays)
        features = 2 * (1 + len(self.decays))
        if architecture == "lstm":
            self.cell = nn.LSTMCell(features, hidden, dtype=dtype)
            with torch.no_grad():
                self.cell.bias_hh[hidden:2 * hidden].fill_(1.0)  # forget gate open at the start
        else:
            self.mlp = nn.Sequential(nn.Linear(features, hidden, dtype=dtype), nn.ReLU(),
                                     nn.Linear(hidden, hidden, dtype=dtype), nn.ReLU())
        self.readout = nn.Linear(hidden, 1, dtype=dtype)
        with torch.no_grad():
            self.readout.weight.zero_()
            self.readout.bias.zero_()
        self.log_output_scale = nn.Parameter(torch.tensor(math.log(output_scale), dtype=dtype))
        self.log_base_lr = (nn.Parameter(torch.tensor(math.log(base_lr), dtype=dtype))
                            if base_lr is not None else None)

    def extra_repr(self) -> str:
        return f"architecture={self.architecture!r}, hidden={self.hidden}, decays={self.decays}"

    def hyper(self) -> Hyper:
        return {}

    def init_state(self, optimizer: InnerOptimizer, params: Params) -> OptState:
        state: OptState = {f"momentum_{i}": {k: torch.zeros_like(p) for k, p in params.items()}
                           for i in range(len(self.decays))}
        if self.architecture == "lstm":
            for name in ("h", "c"):
                state[name] = {k: p.new_zeros(*p.shape, self.hidden) for k, p in params.items()}
        return state

    def _lstm(self, feats: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        # The LSTM cell written out with functional ops, so it runs on any leading shape and under vmap.
        gates = feats @ self.cell.weight_ih.T + self.cell.bias_ih + h @ self.cell.weight_hh.T + self.cell.bias_hh
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def update(self, optimizer: InnerOptimizer, params: Params, grads: Params, opt_state: OptState,
               hyper: Hyper) -> tuple[Params, OptState]:
        new_state: OptState = {}
        momenta = []
        for i, d in enumerate(self.decays):
            old = cast(Params, opt_state[f"momentum_{i}"])
            m = {k: d * old[k] + (1 - d) * g for k, g in grads.items()}
            new_state[f"momentum_{i}"] = m
            momenta.append(m)
        hs: Params = {}
        cs: Params = {}
        new_params = {}
        scale = self.log_output_scale.exp()
        for k, p in params.items():
            feats = torch.cat([preprocess_log_sign(grads[k])] + [preprocess_log_sign(m[k]) for m in momenta], dim=-1)
            if self.architecture == "lstm":
                hs[k], cs[k] = self._lstm(feats, cast(Params, opt_state["h"])[k], cast(Params, opt_state["c"])[k])
                hidden = hs[k]
            else:
                hidden = self.mlp(feats)
            step = scale * self.readout(hidden).squeeze(-1)
            if self.log_base_lr is not None:
                step = step + self.log_base_lr.exp() * grads[k]
            new_params[k] = p - step
        if self.architecture == "lstm":
            new_state["h"], new_state["c"] = hs, cs
        return new_params, new_state
