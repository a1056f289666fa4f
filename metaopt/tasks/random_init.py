"""Tasks that each start from a fresh random initialization of the inner model."""
from __future__ import annotations

import copy

import torch
from torch import nn

from metaopt.tasks.base import TaskDistribution
from metaopt.types import LossFn, Task

__all__ = ["RandomInit"]


class RandomInit(TaskDistribution):
    """Wraps a task distribution so that each task carries its own random init (`Task.init`).

    Dataset distillation and learned optimizers must work from *any* initialization, not
    the one they were meta-trained from: each task draws one with the model's own
    initializers (`reset_parameters` of every submodule), seeded from the task generator,
    so the same generator state gives the same inits. The init is task data: it cannot be
    combined with a learned "init" meta-parameter.

    Args:
      tasks: the wrapped distribution.
      model: the inner model (copied; the original is never re-initialized).
    """

    def __init__(self, tasks: TaskDistribution, model: nn.Module):
        self.tasks = tasks
        self.kind = tasks.kind  # type: ignore[misc]  # the wrapped distribution's kind
        self._model = copy.deepcopy(model)
        if not any(hasattr(m, "reset_parameters") for m in self._model.modules()):
            raise ValueError(f"RandomInit: {type(model).__name__} has no submodule with reset_parameters()")

    def __repr__(self) -> str:
        return f"RandomInit({self.tasks!r})"

    @property
    def loss_fn(self) -> LossFn:
        return self.tasks.loss_fn

    def sample(self, n_tasks: int, inner_steps: int, generator: torch.Generator) -> Task:
        task = self.tasks.sample(n_tasks, inner_steps, generator)
        seeds = torch.randint(0, 2 ** 62, (n_tasks,), generator=generator).tolist()
        inits: list[dict[str, torch.Tensor]] = []
        # On the CPU only the CPU generator is seeded: torch.manual_seed also seeds every accelerator's (queued
        # with a captured stack where CUDA is not initialized), which cost ~1 ms a task, most of a draw.
        on_cpu = all(p.device.type == "cpu" for p in self._model.parameters())
        with torch.random.fork_rng(devices=[]):
            for seed in seeds:
                if on_cpu:
                    torch.default_generator.manual_seed(seed)
                else:
                    torch.manual_seed(seed)
                for module in self._model.modules():
                    reset = getattr(module, "reset_parameters", None)
                    if callable(reset):
                        reset()
                inits.append({k: p.detach().clone() for k, p in self._model.named_parameters()})
        return task._replace(init={k: torch.stack([i[k] for i in inits]) for k in inits[0]})
