"""Gradient checkpointing over segments of the unroll: exact, with memory O(T/S + S)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from metaopt.estimators.base import (
    AbstractEstimator,
    TaskObjective,
    call_with_meta,
    meta_values,
    register,
    task_surrogates,
)
from metaopt.guard import StepGuard, shifted
from metaopt.loop import InnerLoop, unroll
from metaopt.types import Batch, Buffers, InnerState, MetaParams, Params, Task

__all__ = ["Checkpoint"]

# The differentiable part of an inner state: (params, opt_state, anchor). Buffers ride along undifferentiated.
Carry = tuple


def _split(state: InnerState) -> tuple[Carry, Buffers]:
    return (state.params, state.opt_state, state.anchor), state.buffers


def _join(carry: Carry, buffers: Buffers) -> InnerState:
    params, opt_state, anchor = carry
    return InnerState(params, buffers, opt_state, anchor)


def _floating(carry: Carry) -> tuple[list[Tensor], Callable[[list[Tensor]], Carry]]:
    """The carry's floating-point tensors, which the pullbacks differentiate, and a function that puts others in
    their place. The rest is held fixed: `torch.func.vjp` cannot make an integer or bool tensor require grad (a
    ProtoNet's inner state holds a bool mask of the classes present, `PrototypeState.present`)."""
    leaves, spec = tree_flatten(carry)
    where = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.is_floating_point()]

    def rebuild(floats: list[Tensor]) -> Carry:
        full = list(leaves)
        for i, value in zip(where, floats):
            full[i] = value
        return tree_unflatten(full, spec)
    return [leaves[i] for i in where], rebuild


def _add(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] + b[k] for k in a}


def _vjp(fn: Callable[..., torch.Tensor], *primals: object) -> tuple[torch.Tensor, Callable[..., tuple]]:
    out = torch.func.vjp(fn, *primals)
    return out[0], out[1]


def _vjp_with_aux(fn: Callable[..., tuple], *primals: object) -> Callable[..., tuple]:
    """The pullback of fn's first output; fn returns (output, aux) and the aux is not differentiated."""
    return torch.func.vjp(fn, *primals, has_aux=True)[1]


@register("checkpoint")
class Checkpoint(AbstractEstimator):
    """Exact reverse mode with only segment-boundary states kept; each segment recomputed once.

    Forward: the T inner steps run without any graph, keeping the state at the
    start of every segment of S steps (T/S states). Backward: from the last
    segment to the first, the segment is re-run under `torch.func.vjp` (its S
    steps with their inner-gradient graphs) and the adjoint of its input state
    and the meta-gradient are pulled back. Memory O(T/S + S) states and graphs,
    minimal at S ~ sqrt(T); time: one extra forward unroll over `full` (every
    step runs exactly twice). Exact: equals `full` to rounding. Serves every slot;
    runs under vmap and stacked (`metaopt.stacked`: all of a chunk's tasks in each
    segment's pullback at once) (Griewank 1992; Chen et al. 2016).

    Why not `torch.utils.checkpoint`: its non-reentrant mode does keep the inner
    `create_graph`, but a segment whose graph holds inner backward passes has its
    saved tensors unpacked more than once, and every second unpack recomputes the
    segment again: measured 27 recomputed steps instead of 6 for T = S = 6 (torch
    2.13). It also cannot run under vmap or with `torch.func.grad` inner steps.

    Args:
      segment: S, inner steps per segment; None picks ceil(sqrt(T)) per call.
    """

    exact = True
    compiles = False  # torch.compile refuses its recomputation (named_parameters on a reparametrized module)
    stacks = True  # tests/test_stacked.py: equals vmap across the kinds
    relative_time = 1.5  # every inner step runs twice, the second time with its graph

    @classmethod
    def auto_candidates(cls, loop: InnerLoop, meta: MetaParams, steps: int) -> list[AbstractEstimator]:
        """Segments around sqrt(T) (memory O(T/S + S) is smallest there), shorter than T."""
        root = max(1, math.ceil(math.sqrt(steps)))
        return [cls(segment=s) for s in sorted({root, max(1, root // 2), 2 * root}) if s < steps]

    def __init__(self, segment: int | None = None):
        if segment is not None and segment < 1:
            raise ValueError(f"checkpoint: segment must be >= 1 or None, got {segment}")
        self.segment = segment

    def segment_for(self, inner_steps: int) -> int:
        """S for an unroll of T steps."""
        return self.segment if self.segment is not None else max(1, math.ceil(math.sqrt(inner_steps)))

    def predict_peak_bytes(self, measure, steps: int, probes: tuple[int, int] = (16, 64)) -> int:
        """One segment's graph plus one kept state per further segment: p(S) + (ceil(T/S) - 1) c.

        c, the bytes kept per segment boundary, is measured as (p(3S) - p(S)) / 2 with S fixed.
        """
        size = self.segment_for(steps)
        if steps <= 3 * size:
            return measure(steps)
        fixed = Checkpoint(segment=size)
        one, three = measure(size, fixed), measure(3 * size, fixed)
        per_boundary = max(three - one, 0) / 2
        return int(one + per_boundary * (math.ceil(steps / size) - 1))

    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        values = meta_values(meta)
        size = self.segment_for(task.inner_steps)
        segments = [task.support[i:i + size] for i in range(0, task.inner_steps, size)]

        def init(vals: Params) -> tuple[Carry, Buffers]:
            return _split(call_with_meta(meta, vals, lambda m: loop.init(m, task.init)))

        def run(carry: Carry, vals: Params, buffers: Buffers, batches: Sequence[Batch],
                offset: int) -> tuple[Carry, Buffers]:
            hook = shifted(guard, offset)
            state = call_with_meta(meta, vals, lambda m, s: unroll(loop, s, batches, m, on_step=hook),
                                   _join(carry, buffers))
            return _split(state)

        with torch.no_grad():  # forward sweep: no graph, keep segment inputs only
            carry, buffers = init(values)
            inputs = []
            for i, batches in enumerate(segments):
                inputs.append((carry, buffers))
                carry, buffers = run(carry, values, buffers, batches, i * size)

        floats, rebuild = _floating(carry)
        loss, pullback = _vjp(lambda c, v: call_with_meta(meta, v, lambda m, s: loop.outer_loss(s, task.query, m),
                                                          _join(rebuild(c), buffers)), floats, values)
        adjoint, grads = pullback(torch.ones_like(loss))
        # Each pullback holds its segment's graph: drop it before the next segment is recomputed,
        # or two segments' graphs are alive at once.
        del pullback
        while segments:
            offset = (len(segments) - 1) * size
            batches, (carry_in, buffers_in) = segments.pop(), inputs.pop()
            floats, rebuild = _floating(carry_in)

            def segment(c: list[Tensor], v: Params) -> tuple[list[Tensor], Buffers]:
                carry_out, buffers_out = run(rebuild(c), v, buffers_in, batches, offset)
                return _floating(carry_out)[0], buffers_out
            pullback = _vjp_with_aux(segment, floats, values)
            adjoint, segment_grads = pullback(adjoint)
            del pullback
            grads = _add(grads, segment_grads)

        def started(v: Params) -> tuple[list[Tensor], Buffers]:
            carry_out, buffers_out = init(v)
            return _floating(carry_out)[0], buffers_out
        init_pullback = _vjp_with_aux(started, values)
        grads = _add(grads, init_pullback(adjoint)[0])
        return TaskObjective(task_surrogates(meta, grads, loss), loss.detach())  # stacked: per task
