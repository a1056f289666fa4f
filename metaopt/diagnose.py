"""Finding where a non-finite value first appears in a task's inner loop."""
from __future__ import annotations

import math

import torch

from metaopt.loop import InnerLoop
from metaopt.types import MetaParams, Task

__all__ = ["locate_nonfinite"]


def locate_nonfinite(loop: InnerLoop, meta: MetaParams, task: Task) -> str:
    """Replay one task's unroll step by step (no meta-gradient graph) and say where it first goes non-finite.

    Returns:
      e.g. "inner step 3: inner loss is nan", "inner step 2: parameter 'net.0.weight' is inf",
      "the outer loss (after 5 inner steps) is nan", or "no non-finite value on replay".
    """
    with torch.no_grad():
        state = loop.init(meta, task.init)
        for name, p in state.params.items():
            if not torch.isfinite(p).all():
                return f"the initial parameter {name!r} is not finite"
        for t, batch in enumerate(task.support):
            batch = loop.support_batch(batch, meta)
            with torch.enable_grad():
                loss = loop.inner_objective(state.params, state, batch, meta)[0]
            if not math.isfinite(loss.item()):
                return f"inner step {t + 1}: inner loss is {loss.item()}"
            state = loop.step(state, task.support[t], meta, create_graph=False)
            for name, p in state.params.items():
                if not torch.isfinite(p).all():
                    return f"inner step {t + 1}: parameter {name!r} becomes non-finite"
        outer = loop.outer_loss(state, task.query, meta).item()
        if not math.isfinite(outer):
            return f"the outer loss (after {task.inner_steps} inner steps) is {outer}"
    return "no non-finite value on replay"
