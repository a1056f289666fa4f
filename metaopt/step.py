"""One meta-step, in the parts a pipelined train loop needs: launch, settle, account, optimize.

`TrainState` holds everything a run carries from one meta-step to the next (meta-parameters, outer
optimizer, the task generator, counters, history) and checkpoints and resumes as one object.
`meta_step(state, batch, config)` plans nothing and loops over nothing: it asks the planned estimator for a
meta-gradient, handles non-finite tasks, and steps the outer optimizer. It is four calls:

- `launch`: the meta-gradient, and the finiteness flag and the mean outer loss computed on the device and
  sent to the host without waiting (`metaopt.overlap.HostCopy`);
- `settle`: read them (the one wait for the device in a meta-step); where something is not finite, raise
  with the location or drop the bad tasks and compute again;
- `account`: the step's counters and metrics (`state.step` advances);
- `optimize`: the meta-gradient into `.grad`, clipping, the learning-rate schedule, the optimizer's step.

Called in that order they are one synchronous meta-step. `metaopt.overlap` calls `optimize` before `settle`
(undoably), so that on a GPU the host launches the next meta-step while the device still computes this one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, NamedTuple

import torch
from torch import Tensor

from metaopt.batching import unstack_tasks
from metaopt.budget import Budget
from metaopt.diagnose import locate_nonfinite
from metaopt.estimators.base import MetaGrad
from metaopt.loop import InnerLoop
from metaopt.overlap import HostCopy
from metaopt.planning import Plan
from metaopt.types import MetaParams, Task

__all__ = ["TrainState", "RandomState", "StepConfig", "Launched", "meta_step", "launch", "settle", "account",
           "optimize", "apply_meta_grad", "updates"]

logger = logging.getLogger("metaopt")


def apply_meta_grad(meta: MetaParams, meta_grad: MetaGrad) -> None:
    """Write a MetaGrad into `.grad` of the meta-parameters (the only place that does)."""
    for name, p in meta.named_parameters():
        if name in meta_grad.grads:
            p.grad = meta_grad.grads[name]


class RandomState:
    """torch's global random streams (CPU and every initialized CUDA device) and a stochastic estimator's own
    generators, as the checkpoint's "rng" and "estimator_rng" entries (`entries`): read now (waiting for no
    device), or taken from `checkpoint`; `restore()` sets the streams to them."""

    def __init__(self, estimator: Any = None, checkpoint: dict[str, Any] | None = None):
        self.estimator = estimator
        if checkpoint is None:
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            rng_state = getattr(estimator, "rng_state", None)
            checkpoint = {"rng": {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()} if cuda
                                                                    else {})},
                          "estimator_rng": rng_state() if rng_state is not None else {}}
        self.entries = {"rng": checkpoint.get("rng"), "estimator_rng": checkpoint.get("estimator_rng") or {}}

    def restore(self) -> None:
        rng, own = self.entries["rng"], self.entries["estimator_rng"]
        if own and self.estimator is not None:
            self.estimator.set_rng_state(own)
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


@dataclass
class TrainState:
    """What a run carries between meta-steps; `state_dict` / `load_state_dict` checkpoint it as one object.

    Attributes:
      meta: the meta-parameters (updated in place by the outer optimizer).
      outer_optimizer: a torch optimizer over `meta.parameters()`.
      generator: the task sampler's random stream.
      step: meta-steps done.
      counts: tasks truncated / skipped under the budget / dropped as non-finite, summed over the run.
      history: one entry per logging interval (meta_step, meta_train_loss, seconds_per_meta_step, counts,
        and the validation metrics where validation ran).
      train_seconds: training wall-clock of earlier sessions of this run (before a resume).
      estimator: the planned estimator; a stochastic one (es, pes, random forward mode) draws from its
        own generators, which the checkpoint holds.
      carry: what an online estimator carries to each task's next window (`MetaGrad.carry`), or None.
      source: the task source's own state (`TaskDistribution.next_batch`: `metaopt.online.OnlineTasks`'
        pool of unrolls and their positions), or None.

    The checkpoint also holds torch's global random state (CPU and CUDA), from which vmapped dropout
    draws, so a resumed run draws what the uninterrupted run would have drawn: resume is bit-exact
    for every estimator.
    """

    meta: MetaParams
    outer_optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {
        "tasks_truncated": 0, "tasks_skipped": 0, "tasks_nan_skipped": 0})
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    estimator: Any = None
    carry: Any = None
    source: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"meta": self.meta.state_dict(), "outer_optimizer": self.outer_optimizer.state_dict(),
                "generator": self.generator.get_state(), "meta_step": self.step, "history": self.history,
                "counts": self.counts, "train_seconds": self.train_seconds, "carry": self.carry,
                "task_source": self.source, **RandomState(self.estimator).entries}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.meta.load_state_dict(ckpt["meta"])
        self.outer_optimizer.load_state_dict(ckpt["outer_optimizer"])
        self.generator.set_state(ckpt["generator"])
        self.step, self.history = ckpt["meta_step"], ckpt["history"]
        self.counts.update(ckpt.get("counts", {}))
        self.train_seconds = ckpt.get("train_seconds", 0.0)
        self.carry, self.source = ckpt.get("carry"), ckpt.get("task_source")
        RandomState(self.estimator, ckpt).restore()

    def finite(self) -> bool:
        """Whether every meta-parameter is finite (a state that is not is never checkpointed)."""
        return all(bool(torch.isfinite(p).all()) for p in self.meta.parameters())


@dataclass
class StepConfig:
    """How each meta-step runs (fixed for a run).

    Attributes:
      loop: the inner loop.
      plan: the planned estimator, batching and chunk size (`metaopt.planning.plan`).
      budget: the per-meta-step budget the run-time guard enforces.
      on_nan: "raise" (naming meta-step, task and inner step) or "skip" (drop the task, count it).
      max_grad_norm: clip the meta-gradient's global norm (None: no clipping).
      clock, memory_probe: the guard's clock and memory probe (tests inject them).
      lr_schedule: the outer learning rate at meta-step s (counted from 0) is the optimizer's initial
        lr times `lr_schedule(s)` (e.g. `metaopt.schedules.Cosine`); the initial lr is kept in each param
        group's "initial_lr", so it is checkpointed with the optimizer. None: a constant lr.
    """

    loop: InnerLoop
    plan: Plan
    budget: Budget
    on_nan: Literal["raise", "skip"] = "raise"
    max_grad_norm: float | None = None
    clock: Callable[[], float] | None = None
    memory_probe: Callable[[], int] | None = None
    lr_schedule: Callable[[int], float] | None = None

    def meta_gradient(self, meta: MetaParams, tasks: Task | list[Task]) -> MetaGrad:
        return self.plan.estimator(self.loop, meta, tasks, self.budget, batching=self.plan.batching,
                                   chunk_size=self.plan.chunk_size, clock=self.clock, memory_probe=self.memory_probe)


class Launched(NamedTuple):
    """A meta-step launched: its meta-gradient (on a GPU, possibly still being computed) and, on its way to
    the host, the finiteness flag and the mean outer loss (`read()` gives [flag, loss] as floats)."""

    batch: Task
    meta_grad: MetaGrad
    check: HostCopy


def meta_step(state: TrainState, batch: Task, config: StepConfig) -> tuple[TrainState, dict[str, float]]:
    """One outer step on a batch of tasks: meta-gradient, non-finite handling, optional clipping, optimizer step.

    Returns the state (its meta-parameters, optimizer and counters updated; `step` advanced) and
    this step's metrics: "meta_train_loss" (NaN when every task was skipped: no update then),
    "tasks", "tasks_truncated", "tasks_skipped".
    """
    meta_grad, outer_loss = settle(state, launch(state, batch, config), config)
    metrics = account(state, meta_grad, outer_loss, config)
    if updates(meta_grad):
        optimize(state, meta_grad, config, state.step - 1)
    return state, metrics


def launch(state: TrainState, batch: Task, config: StepConfig) -> Launched:
    """The meta-gradient of `batch` at the current meta-parameters, and one device tensor [all finite, mean
    outer loss] sent to the host without waiting. Host-side, this waits for nothing (but a budget guard's
    probes, where a budget asks for them)."""
    meta_grad = config.meta_gradient(state.meta, batch)
    losses, used = meta_grad.task_losses, meta_grad.task_used
    assert losses is not None and used is not None  # always set by the runner
    device = next(iter(meta_grad.grads.values())).device
    finite = ~(~torch.isfinite(losses) & used).any().to(device) & torch.isfinite(
        torch.stack(_largest_magnitudes(meta_grad.grads.values()))).all()
    loss = meta_grad.outer_loss.detach().reshape(()).to(device)
    return Launched(batch, meta_grad, HostCopy(torch.stack([finite.to(loss.dtype), loss])))


def settle(state: TrainState, launched: Launched, config: StepConfig) -> tuple[MetaGrad, float]:
    """Read the launched step's flag and loss (the one wait for the device per meta-step); where anything is not
    finite, raise with the location or drop the bad tasks (`config.on_nan`), at the meta-parameters the step
    was launched at. Returns the meta-gradient to apply and its mean outer loss as a float (exact: a float of its
    dtype; NaN where every task was dropped)."""
    all_finite, outer_loss = launched.check.read()
    if all_finite:
        return launched.meta_grad, outer_loss
    meta_grad = launched.meta_grad
    assert meta_grad.task_losses is not None and meta_grad.task_used is not None
    losses = meta_grad.task_losses
    bad = ~torch.isfinite(losses) & meta_grad.task_used
    tasks = unstack_tasks(launched.batch)
    bad_indices = [int(i) for i in torch.nonzero(bad).flatten()] or list(range(len(tasks)))
    if config.on_nan == "skip":
        good = [t for i, t in enumerate(tasks) if i not in bad_indices]
        state.counts["tasks_nan_skipped"] += len(tasks) - len(good)
        logger.warning("meta-step %d: dropped %d task(s) with non-finite values", state.step, len(tasks) - len(good))
        if not good:
            return meta_grad._replace(stats={**meta_grad.stats, "tasks_skipped": len(tasks)}, carry=None), math.nan
        result = config.meta_gradient(state.meta, good)._replace(carry=None)  # the dropped tasks' carry is gone
        if bool(torch.isfinite(torch.stack(_largest_magnitudes(result.grads.values()))).all()):
            return result, result.outer_loss.item()
        bad_indices = list(range(len(tasks)))
    where = locate_nonfinite(config.loop, state.meta, tasks[bad_indices[0]])
    raise FloatingPointError(f"meta-step {state.step}, task {bad_indices[0]}: {where} "
                             f"(outer loss {losses[bad_indices[0]].item()}); use on_nan='skip' to drop such tasks")


def account(state: TrainState, meta_grad: MetaGrad, outer_loss: float, config: StepConfig) -> dict[str, float]:
    """Count a settled meta-step (`state.step` advances; the carry is kept) and return its metrics."""
    state.carry = meta_grad.carry
    stats = meta_grad.stats
    state.counts["tasks_truncated"] += int(stats["tasks_truncated"])
    state.counts["tasks_skipped"] += int(stats["tasks_skipped"])
    if stats["tasks_truncated"] or stats["tasks_skipped"]:
        logger.warning("meta-step %d: %d task(s) truncated, %d skipped (budget %s)", state.step,
                       stats["tasks_truncated"], stats["tasks_skipped"], config.budget)
    state.step += 1
    return {"meta_train_loss": outer_loss if updates(meta_grad) else math.nan, "tasks": float(stats["tasks"]),
            "tasks_truncated": float(stats["tasks_truncated"]), "tasks_skipped": float(stats["tasks_skipped"])}


def updates(meta_grad: MetaGrad) -> bool:
    """Whether the meta-gradient is applied: not when every task was skipped (nothing to learn from)."""
    return meta_grad.stats["tasks_skipped"] != meta_grad.stats["tasks"]


def optimize(state: TrainState, meta_grad: MetaGrad, config: StepConfig, step: int) -> None:
    """The outer optimizer's step on `meta_grad` at meta-step `step` (counted from 0; the learning-rate schedule
    reads it): `.grad` written, clipped where asked, then stepped and cleared. Launches device work only (no read)."""
    apply_meta_grad(state.meta, meta_grad)
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(state.meta.parameters()), config.max_grad_norm)
    if config.lr_schedule is not None:
        factor = config.lr_schedule(step)
        for group in state.outer_optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
    state.outer_optimizer.step()
    state.outer_optimizer.zero_grad(set_to_none=True)


def _largest_magnitudes(tensors: Iterable[Tensor]) -> list[Tensor]:
    """Each non-empty tensor's largest |entry| (0-d tensors, on its device): NaN or inf exactly where the tensor
    has a non-finite entry. Two multi-tensor ops for all of them (fused kernels on CUDA), not two per tensor:
    on a GPU the train loop's host time per meta-step is what the whole step adds to the bare meta-gradient."""
    present = [t for t in tensors if t.numel()]
    return list(torch._foreach_max(torch._foreach_abs(present))) if present else [torch.zeros(())]
