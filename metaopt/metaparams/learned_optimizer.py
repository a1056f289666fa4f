"""A learned inner optimizer: one small network applied to every coordinate (Andrychowicz et al. 2016).

Coordinate-wise: the network sees one parameter entry at a time (its gradient and
momenta, preprocessed), with weights shared across all entries of all tensors, so its
size does not depend on the model's. Per-coordinate state (momenta; the LSTM's h and
c) lives in the inner optimizer state, so every estimator unrolls it unchanged.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from metaopt.metaparams.base import AbstractOptimizerMetaParam
from metaopt.optim import AdamState, EmaState, InnerOptimizer, adam_rms, ema, scale_by_adam
from metaopt.types import Hyper, OptState, Params

__all__ = ["LearnedOptimizer", "LearnedOptimizerState", "preprocess_log_sign"]

Architecture = Literal["lstm", "mlp"]
Base = Literal["sgd", "adam"]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def preprocess_log_sign(x: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al.'s input scaling: x -> (log|x| / p, sign x) if |x| >= e^-p else (-1, e^p x).

    Maps values of any magnitude to two O(1) features. Shape [...] -> [..., 2].
    """
    small = x.abs() < math.exp(-p)
    magnitude = torch.where(small, -torch.ones_like(x), torch.log(x.abs().clamp_min(math.exp(-p))) / p)
    direction = torch.where(small, math.exp(p) * x, torch.sign(x))
    return torch.stack([magnitude, direction], dim=-1)


class LearnedOptimizerState(NamedTuple):
    """The learned rule's per-coordinate state.

    Attributes:
      adam: Adam's moments (`metaopt.optim.scale_by_adam`, b1 0.9, b2 0.999): v normalizes the
        features, and m / sqrt(v) is the "adam" base direction.
      momenta: one `EmaState` per momentum decay (features).
      h, c: the LSTM's hidden and cell state, [*param.shape, hidden] per parameter (empty for "mlp").
    """

    adam: AdamState
    momenta: tuple[EmaState, ...]
    h: Params
    c: Params


class LearnedOptimizer(AbstractOptimizerMetaParam):
    """A coordinate-wise learned update rule (slot "optimizer").

    Per coordinate, the features are the gradient g and the momenta
    m_d <- d m_d + (1 - d) g for each decay d (`metaopt.optim.ema`), each preprocessed two
    ways: Andrychowicz et al.'s log-magnitude and sign (`preprocess_log_sign`, 2 features
    each) and divided by the root of Adam's bias-corrected second moment v (Metz et al.
    2022's normalized features; the moments are `metaopt.optim.scale_by_adam`'s). The network ("lstm": one LSTM cell
    with per-coordinate hidden state, then a linear read-out; "mlp": two hidden layers,
    stateless apart from the moments) outputs one number per coordinate, and

        p <- p - base_lr * base - output_scale * tanh(network(features))

    where base is the gradient ("sgd") or m_0.9 / sqrt(v) with bias corrections
    ("adam"), or absent (None). The read-out starts at zero, so before meta-training
    the rule is its base with `base_lr`; meta-training learns the step size and what to
    add. The rule ignores the loop's own `InnerOptimizer` and its hyperparameters.

    Bounded, as in Metz et al. 2022: the network's contribution to a coordinate's step is
    at most `output_scale` (tanh), and both learned step sizes are `max x sigmoid(logit)`,
    at most `max_base_lr` / `max_output_scale` (default 10x their initial values), so no
    meta-gradient step can make the rule take unbounded inner steps. (Unbounded, the
    shipped config's meta-training collapsed to chance loss at meta-step 300 on one seed.)

    Args:
      model: the inner model (only its parameters' dtype is used: the rule's size is
        independent of the model's).
      architecture: "lstm" or "mlp".
      hidden: hidden units.
      decays: momentum decay rates used as features.
      base: "sgd", "adam" or None.
      base_lr: the initial learning rate of the base term (learned).
      output_scale: the initial scale of the network's output (learned).
      max_base_lr, max_output_scale: their upper bounds (None: 10x the initial value).
    """

    adam_b1, adam_b2, adam_eps, adam_eps_root = 0.9, 0.999, 1e-8, 1e-16

    elementwise = False  # its own update rule: per task under vmap when stacked

    def __init__(self, model: nn.Module, architecture: Architecture = "lstm", hidden: int = 20,
                 decays: Sequence[float] = (0.5, 0.9, 0.99), base: Base | None = "sgd", base_lr: float = 0.1,
                 output_scale: float = 0.01, max_base_lr: float | None = None, max_output_scale: float | None = None):
        super().__init__()
        if architecture not in ("lstm", "mlp"):
            raise ValueError(f"LearnedOptimizer: architecture must be 'lstm' or 'mlp', got {architecture!r}")
        if hidden < 1 or not all(0 <= d < 1 for d in decays):
            raise ValueError(f"LearnedOptimizer: need hidden >= 1 and decays in [0, 1); got {hidden}, {decays}")
        if base not in ("sgd", "adam", None):
            raise ValueError(f"LearnedOptimizer: base must be 'sgd', 'adam' or None, got {base!r}")
        if base_lr <= 0 or output_scale <= 0:
            raise ValueError(f"LearnedOptimizer: base_lr and output_scale must be > 0, got {base_lr}, {output_scale}")
        dtype = next(model.parameters()).dtype
        self.architecture, self.hidden, self.decays, self.base = architecture, hidden, tuple(decays), base
        features = 3 * (1 + len(self.decays))
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
        self.max_output_scale = 10 * output_scale if max_output_scale is None else max_output_scale
        self.max_base_lr = 10 * base_lr if max_base_lr is None else max_base_lr
        if not (output_scale < self.max_output_scale and base_lr < self.max_base_lr):
            raise ValueError("LearnedOptimizer: the initial output_scale and base_lr must be below their maxima")
        self.output_scale_logit = nn.Parameter(torch.tensor(_logit(output_scale / self.max_output_scale), dtype=dtype))
        self.base_lr_logit = (nn.Parameter(torch.tensor(_logit(base_lr / self.max_base_lr), dtype=dtype))
                              if base else None)
        self._adam = scale_by_adam(self.adam_b1, self.adam_b2, self.adam_eps, self.adam_eps_root)
        self._momenta = [ema(d) for d in self.decays]

    def extra_repr(self) -> str:
        return f"architecture={self.architecture!r}, hidden={self.hidden}, decays={self.decays}, base={self.base!r}"

    def hyper(self) -> Hyper:
        return {}

    def init_state(self, optimizer: InnerOptimizer, params: Params) -> LearnedOptimizerState:
        lstm = self.architecture == "lstm"
        hidden = {k: p.new_zeros(*p.shape, self.hidden) for k, p in params.items()} if lstm else {}
        return LearnedOptimizerState(self._adam.init(params), tuple(m.init(params) for m in self._momenta),
                                     hidden, {k: v.clone() for k, v in hidden.items()})

    def _lstm(self, feats: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        # The LSTM cell written out with functional ops, so it runs on any leading shape and under vmap.
        gates = feats @ self.cell.weight_ih.T + self.cell.bias_ih + h @ self.cell.weight_hh.T + self.cell.bias_hh
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def update(self, optimizer: InnerOptimizer, params: Params, grads: Params, opt_state: OptState,
               hyper: Hyper) -> tuple[Params, LearnedOptimizerState]:
        if not isinstance(opt_state, LearnedOptimizerState):
            raise TypeError(f"LearnedOptimizer.update needs the state its init_state made, got {type(opt_state)}")
        adam_direction, adam = self._adam.update(grads, opt_state.adam, params, self._adam.defaults)
        momenta, ema_states = [], []
        for transform, old in zip(self._momenta, opt_state.momenta):
            m, new = transform.update(grads, old, params, {})
            momenta.append(m)
            ema_states.append(new)
        hs: Params = {}
        cs: Params = {}
        new_params = {}
        # Per-step scalars, computed once for all parameter tensors.
        scale = self.max_output_scale * torch.sigmoid(self.output_scale_logit)
        base_lr = self.max_base_lr * torch.sigmoid(self.base_lr_logit) if self.base_lr_logit is not None else None
        for k, p in params.items():
            rms = adam_rms(adam.nu[k], adam.step, self.adam_b2, self.adam_eps, self.adam_eps_root)
            inputs = [grads[k]] + [m[k] for m in momenta]
            feats = torch.cat([preprocess_log_sign(x) for x in inputs] + [torch.stack([x / rms for x in inputs], -1)],
                              dim=-1)
            if self.architecture == "lstm":
                hs[k], cs[k] = self._lstm(feats, opt_state.h[k], opt_state.c[k])
                hidden = hs[k]
            else:
                hidden = self.mlp(feats)
            delta = scale * torch.tanh(self.readout(hidden).squeeze(-1))
            if base_lr is not None:
                direction = grads[k] if self.base == "sgd" else adam_direction[k]
                delta = delta + base_lr * direction
            new_params[k] = p - delta
        return new_params, LearnedOptimizerState(adam, tuple(ema_states), hs, cs)
