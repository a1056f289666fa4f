"""Outer learning-rate schedules: the multiplier of the initial learning rate at meta-step s.

Pure functions of the meta-step (no state of their own), so a resumed run continues the same
schedule from its checkpointed step. Use them as `meta_train(..., lr_schedule=Cosine(1000))`
or in a config as `lr_schedule: {_target_: metaopt.schedules.Cosine, total_steps: ${meta_steps}}`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Cosine", "StepDecay"]


@dataclass(frozen=True)
class Cosine:
    """Linear warm-up over `warmup_steps`, then a half cosine from 1 to `final` at `total_steps` (and `final`
    after). Snell et al.'s and most few-shot recipes decay the outer lr; cosine needs no decay points."""

    total_steps: int
    final: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps < self.total_steps or not 0 <= self.final <= 1:
            raise ValueError(f"Cosine(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                             f"final={self.final}): need 0 <= warmup_steps < total_steps and 0 <= final <= 1")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepDecay:
    """`gamma ** (step // every)`: Snell et al. halve the ProtoNet learning rate every 2000 episodes."""

    every: int
    gamma: float = 0.5

    def __post_init__(self) -> None:
        if self.every < 1 or not 0 < self.gamma <= 1:
            raise ValueError(f"StepDecay(every={self.every}, gamma={self.gamma}): need every >= 1 and 0 < gamma <= 1")

    def __call__(self, step: int) -> float:
        return self.gamma ** (step // self.every)
