"""Test-time fine-tuning of a ProtoNet's embedding on a task's own support set (evaluation only).

A ProtoNet answers an unseen alphabet with an embedding trained on others. Before it makes a task's prototypes,
`tune_on_support` takes a few Adam steps on that task alone: warped copies of each support image must land
nearest their own image's prototype (the ProtoNet loss with the support as prototypes and its distortions as
queries), which adapts the embedding to the new alphabet's strokes with no label but the support's. This is
Koch et al.'s (2015) distortions used as a task's training data, and a multi-step relative of Proto-MAML's
inner step (Triantafillou et al. 2020); README measures it on Lake et al.'s within-alphabet protocol.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from metaopt import losses
from metaopt.class_means import class_means, prototype_logits
from metaopt.optim import adam
from metaopt.tasks.augment import affine, random_affine
from metaopt.types import Batch, Params

__all__ = ["SupportTuning", "tune_on_support", "with_support_tuning"]

_Loop = TypeVar("_Loop")


@dataclass(frozen=True)
class SupportTuning:
    """How a ProtoNet fine-tunes its embedding on a task's support before making the prototypes.

    Attributes:
      steps: Adam steps per task (0: no tuning).
      lr: Adam's learning rate.
      copies: warped copies of every support image per step (the step's queries; with 9 test-time views of each
        support image, 1 copy is already 9 warped queries per character: README's setting).
      degrees, shear, scale: the distortions' ranges (`metaopt.tasks.augment.random_affine`).
      shift: a translation of up to `shift` pixels (uniform, continuous) on top of each distortion.
      bank: how many distortions are drawn, once, from `seed`: copy j of image i at step s takes map
        (s * copies * n + j * n + i) mod `bank`. The same maps for every task, so an evaluation is deterministic and
        vmaps over tasks (no random op under vmap).
      seed: the seed of the bank.
    """

    steps: int = 20
    lr: float = 1e-4
    copies: int = 1
    degrees: float = 10.0
    shear: float = 0.3
    scale: float = 0.2
    shift: float = 2.0
    bank: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.copies < 1 or self.bank < 1 or self.lr <= 0:
            raise ValueError(f"SupportTuning: need steps >= 0, copies >= 1, bank >= 1 and lr > 0, got {self}")
        # Drawn here, never under vmap (where a random op would be batched or refused).
        generator = torch.Generator().manual_seed(self.seed)
        maps = random_affine(self.bank, self.degrees, self.shear, self.scale, generator, torch.float64)
        maps[:, :, 2] = (torch.rand((self.bank, 2), generator=generator, dtype=torch.float64) * 2 - 1) * self.shift
        object.__setattr__(self, "_maps", maps)  # the translation in pixels

    def thetas(self, size: int) -> Tensor:
        """The bank: `F.affine_grid` thetas [bank, 2, 3] (float64) for images `size` pixels wide."""
        pixels = torch.tensor([1.0, 1.0, 2.0 / size], dtype=torch.float64)  # one pixel in normalized coordinates
        return self._maps * pixels  # type: ignore[attr-defined]


def tune_on_support(embed: Callable[[Params, Tensor], Tensor], params: Params, support: Batch, n_way: int,
                    tuning: SupportTuning) -> Params:
    """`params` after `tuning.steps` Adam steps on one task's support (see the module docstring).

    Args:
      embed: (params, images [n, C, H, W]) -> embeddings [n, D].
      params: the embedding's parameters (the meta-learned initialization; not changed).
      support: the task's support batch, x [n, C, H, W] and labels y [n] in 0..n_way-1 (with test-time views,
        every view is a support image).
      n_way: the task's number of classes (a class without support gets no prototype).

    Returns the tuned parameters, detached: evaluation only, nothing flows back to the initialization.
    Under `torch.no_grad()` too (`torch.func.grad` computes the tuning's gradients); vmaps over tasks, but a conv4
    tunes faster one task at a time (`evaluate(..., batching="loop")`: 56 s against 95 s vmapped for the same
    tasks, 2026-12-04, one CPU thread; vmapped convolution backward is the cost). Each step is a forward and
    backward pass over the support and `copies` times as many warped images: ~0.5 s for a 20-way task with 9 views
    (180 + 180 images) on one CPU thread.
    """
    if tuning.steps == 0:
        return params
    x, y = support.x, support.y
    theta = tuning.thetas(x.shape[-1]).to(x.dtype)
    copies, labels = x.repeat(tuning.copies, 1, 1, 1), y.repeat(tuning.copies)
    count = copies.shape[0]
    optimizer = adam(tuning.lr)

    def loss(p: Params, queries: Tensor) -> Tensor:
        return losses.cross_entropy(prototype_logits(embed(p, queries), class_means(embed(p, x), y, n_way)), labels)

    params = {k: v.detach() for k, v in params.items()}
    opt_state = optimizer.init(params)
    gradient = torch.func.grad(loss)
    for step in range(tuning.steps):
        index = (step * count + torch.arange(count)) % tuning.bank
        grads = gradient(params, affine(copies, theta[index]))
        params, opt_state = optimizer.update(params, grads, opt_state, {})
    return {k: v.detach() for k, v in params.items()}


def with_support_tuning(loop: _Loop, tuning: SupportTuning | None) -> _Loop:
    """`loop` fine-tuning its embedding on each task's support with `tuning` (a ProtoNet or an ensemble of them:
    their `with_support_tuning`); `loop` itself when `tuning` is None or takes no step.

    Raises:
      ValueError: steps asked of a loop that cannot tune (MAML, Proto-MAML: they adapt by their own inner steps).
    """
    if tuning is None or not tuning.steps:
        return loop
    method = getattr(loop, "with_support_tuning", None)
    if method is None:
        raise ValueError(f"support tuning ({tuning.steps} steps) is for ProtoNets and their ensembles, not "
                         f"{type(loop).__name__}")
    return method(tuning)
