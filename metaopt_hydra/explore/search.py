"""Search spaces (conf/search/*.yaml) as Optuna distributions, and children perturbed around a configuration.

An entry names any key of conf/train.yaml (a config group such as `estimator` too) and how to draw it:

    params:
      estimator:      {dist: categorical, choices: [full, checkpoint, truncated, first_order, implicit]}
      inner_steps:    {dist: int, low: 1, high: 50, log: true}
      inner_optim.lr: {dist: loguniform, low: 0.001, high: 0.3}
      model.hidden:   {dist: fixed, value: [40, 40]}
"""
from __future__ import annotations

import math
import random
from typing import Any, Mapping, cast

import optuna
from omegaconf import DictConfig, OmegaConf

__all__ = ["SearchSpace"]

DISTRIBUTIONS = ("uniform", "loguniform", "int", "categorical", "fixed")


class SearchSpace:
    """The searched keys' Optuna distributions and the fixed keys' values.

    Raises:
      ValueError: an entry without a known `dist`, or with bounds that do not make a range (named).
    """

    def __init__(self, params: Mapping[str, Any]):
        self.distributions: dict[str, optuna.distributions.BaseDistribution] = {}
        self.fixed: dict[str, Any] = {}
        for key, spec in params.items():
            spec = cast(dict, OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec))
            kind = spec.get("dist")
            if kind not in DISTRIBUTIONS:
                raise ValueError(f"search entry {key!r}: dist must be one of {', '.join(DISTRIBUTIONS)}, got {kind!r}")
            if kind == "fixed":
                self.fixed[key] = spec["value"]
            elif kind == "categorical":
                self.distributions[key] = optuna.distributions.CategoricalDistribution(list(spec["choices"]))
            elif kind == "int":
                self.distributions[key] = optuna.distributions.IntDistribution(
                    int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)))
            else:
                low, high = float(spec["low"]), float(spec["high"])
                if not low < high or (kind == "loguniform" and low <= 0):
                    raise ValueError(f"search entry {key!r}: need 0 < low < high for loguniform, low < high else")
                self.distributions[key] = optuna.distributions.FloatDistribution(low, high, log=kind == "loguniform")

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """Hydra overrides for a trial: the fixed keys, then the drawn ones (`key=value`)."""
        return [f"{k}={_literal(v)}" for k, v in {**self.fixed, **params}.items()]

    def perturb(self, params: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """A child: each searched value moved a little (floats by ~20% in log space or 10% of the range, ints by
        one step, categoricals switched with probability 0.3), at least one of them changed."""
        child = dict(params)
        keys = list(self.distributions)
        must = rng.choice(keys) if keys else None
        for key in keys:
            if key == must or rng.random() < 0.5:
                child[key] = self._move(self.distributions[key], params[key], rng, force=key == must)
        return child

    @staticmethod
    def _move(dist: optuna.distributions.BaseDistribution, value: Any, rng: random.Random, force: bool) -> Any:
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            others = [c for c in dist.choices if c != value]
            return rng.choice(others) if others and (force or rng.random() < 0.3) else value
        if isinstance(dist, optuna.distributions.IntDistribution):
            step = rng.choice([-1, 1]) * max(1, round(abs(value) * 0.2) if dist.log else 1)
            return int(min(dist.high, max(dist.low, value + step)))
        assert isinstance(dist, optuna.distributions.FloatDistribution)
        if dist.log:
            moved = math.exp(math.log(value) + rng.gauss(0, 0.2))
        else:
            moved = value + rng.gauss(0, 0.1 * (dist.high - dist.low))
        return float(min(dist.high, max(dist.low, moved)))


def _literal(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value)
