"""The estimator interface, `MetaGrad`, and the registry by name.

An estimator is one way of differentiating (or not) the same unrolled
composition `outer_loss(step^T(init(meta)))`. Each one defines, for one task,
a `TaskObjective`: a scalar *surrogate* whose gradient with respect to the
meta-parameters is that estimator's meta-gradient (for `full`, the outer loss
itself), and the outer loss for reporting. It only differentiates: batching,
chunks, the budget guard and retries belong to `metaopt.runner`, which calling
an estimator goes through, and which returns a `MetaGrad`. Estimators have no
side effects: only the training loop writes `.grad`.

This package never imports `metaopt.metaparams`.
"""
from __future__ import annotations

import abc
import inspect
from typing import Any, Callable, ClassVar, Protocol, Sequence, TypeVar, cast

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

from metaopt.batching import Batching
from metaopt.budget import Budget
from metaopt.compiled import Compiled
from metaopt.guard import StepGuard
from metaopt.loop import InnerLoop
from metaopt.metacall import call_with_meta, meta_values
from metaopt.runner import MetaGrad, TaskObjective, grads_of, run_meta_gradient
from metaopt.stacked import stacked_blocker, stacked_slower
from metaopt.types import MetaParams, Task

__all__ = [
    "MetaGrad",
    "TaskObjective",
    "AbstractEstimator",
    "EstimatorUnsupported",
    "UnknownEstimator",
    "register",
    "get_estimator",
    "available_estimators",
    "registered_estimators",
    "MetaGradientMethod",
    "grads_of",
    "meta_values",
    "call_with_meta",
    "linear_surrogate",
    "task_surrogates",
    "map_leading_axis",
    "stack_trees",
]


class Measure(Protocol):
    """Measured peak bytes of an estimator (default: the one predicting) on the task cut to `steps` steps."""

    def __call__(self, steps: int, estimator: "AbstractEstimator | None" = None) -> int: ...


class EstimatorUnsupported(ValueError):
    """An estimator cannot serve this inner loop or meta-parameter kind."""


class UnknownEstimator(ValueError):
    """No estimator is registered under this name."""


def linear_prediction(measure: Measure, steps: int, low: int, high: int,
                      estimator: AbstractEstimator | None = None) -> int:
    """measure(steps) if steps <= high, else the line through the probes at `low` and `high` steps."""
    if steps <= high:
        return measure(steps, estimator)
    at_low, at_high = measure(low, estimator), measure(high, estimator)
    return int(at_high + max(at_high - at_low, 0) * (steps - high) / (high - low))


def linear_seconds(time_at: Callable[[int], float], steps: int, low: int, high: int) -> float:
    """time_at(steps) if steps <= high, else the line through the timings at `low` and `high` steps (its slope
    at least 0: timing noise must not predict a longer unroll to be faster)."""
    if steps <= high:
        return time_at(steps)
    at_low, at_high = time_at(low), time_at(high)
    return at_high + max(at_high - at_low, 0.0) * (steps - high) / (high - low)


def linear_surrogate(meta: MetaParams, grads: dict[str, Tensor]) -> Tensor:
    """sum_k <meta_k, grads_k.detach()>: a scalar whose gradient w.r.t. meta is `grads`."""
    params = dict(meta.named_parameters())
    return torch.stack([(params[k] * g.detach()).sum() for k, g in grads.items()]).sum()


def task_surrogates(meta: MetaParams, grads: dict[str, Tensor], loss: Tensor) -> Tensor:
    """Per-task surrogates, shaped like `loss`, for `grads` summed over the tasks of `loss` (a pullback or a
    push-forward of a stacked chunk's per-task losses [B] sums their gradients): each task's is 1/B of
    `linear_surrogate`'s, so that their mean differentiates to the tasks' mean gradient. One task (0-d loss, under
    vmap or alone): `linear_surrogate` itself (divided by 1)."""
    return (linear_surrogate(meta, grads) / loss.numel()).expand(loss.shape)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Pytrees of one structure stacked leaf by leaf on a new leading axis."""
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def map_leading_axis(fn: Callable[..., Any], *args: Any, vectorized: bool, randomness: str = "different") -> Any:
    """`fn` of each slice of `args` along their leading axis (pytrees of tensors; a None argument is passed as is),
    the outputs stacked leaf by leaf: one call vmapped over the axis where `vectorized` (the repetitions of an
    estimator run as one pass: forward's tangents, ES's particles), else one call per slice (the sequential
    computation, bit for bit)."""
    if vectorized:
        in_dims = tuple(None if a is None else 0 for a in args)
        return torch.func.vmap(fn, in_dims=in_dims, randomness=randomness)(*args)
    n = next(leaf.shape[0] for a in args if a is not None for leaf in tree_leaves(a))
    return stack_trees([fn(*(None if a is None else tree_map(lambda v: v[i], a) for a in args)) for i in range(n)])


class AbstractEstimator(abc.ABC):
    """A way of computing the meta-gradient of the outer loss.

    Subclasses define `task_objective` for one task and document, in their class
    docstring, what they compute, their memory and time in T, whether they are
    exact, and what they cannot serve.

    Class attributes:
      name: the registry name (set by `register`).
      exact: True if the meta-gradient equals full backprop's up to rounding.
      supports_vmap: whether `task_objective` may run under `torch.func.vmap`.
      second_order: whether it differentiates through inner gradients (then models
        with layers that PyTorch gets wrong under vmap run task by task).
    """

    name: ClassVar[str] = "?"
    exact: bool  # a class default; ForwardMode sets it per instance (exact or random mode)
    supports_vmap: ClassVar[bool] = True
    second_order: ClassVar[bool] = True
    relative_time: float = 1.0
    """Time of a meta-gradient relative to full backprop's (the planner ranks equally exact estimators by it)."""
    compiles: ClassVar[bool] = False
    """Whether `metaopt.compiled.Compiled` may trace it (tested: compiled equals eager across the kinds). A
    failed trace inside forward-mode or nested transforms can leave torch's transform stack unusable for the
    eager fallback, so only declared estimators are traced."""

    online: ClassVar[bool] = False
    """Whether it continues a task's unroll from `Task.carry` and returns the next carry (`OnlinePES`): the
    estimators that can train on `metaopt.online.OnlineTasks`' windows."""

    stochastic: bool = False
    """Whether it draws random numbers. It then draws them from its own generators (`noise_like`), one per
    device, seeded by its `seed`, never from torch's global stream; `rng_state` checkpoints them."""
    seed: int = 0

    def noise_like(self, value: Tensor) -> Tensor:
        """Standard normal noise with `value`'s shape, dtype and device, from this estimator's own stream
        (per task under vmap, which runs with randomness="different")."""
        generators = self.__dict__.setdefault("_generators", {})
        key = str(value.device)
        if key not in generators:
            generators[key] = torch.Generator(value.device).manual_seed(self.seed)
        return torch.randn(value.shape, generator=generators[key], dtype=value.dtype, device=value.device)

    def rng_state(self) -> dict[str, Tensor]:
        """The state of each device's generator (empty before the first draw)."""
        return {device: g.get_state() for device, g in self.__dict__.get("_generators", {}).items()}

    def set_rng_state(self, state: dict[str, Tensor]) -> None:
        """Restore `rng_state()`'s output (a resumed run draws what the uninterrupted run would have)."""
        generators = self.__dict__.setdefault("_generators", {})
        for device, value in state.items():
            generators[device] = torch.Generator(device)
            generators[device].set_state(value)

    @classmethod
    def auto_candidates(cls, loop: InnerLoop, meta: MetaParams, steps: int) -> list["AbstractEstimator"]:
        """The configurations of this estimator that `auto` may choose at T = `steps` (none by default:
        noisy or approximate baselines are never chosen for the user). Checked by the planner."""
        return []

    def bias(self, steps: int) -> float:
        """How far the estimate is from the exact meta-gradient, for ranking by `auto`: 0 exact,
        1 first-order (every second-order term dropped), in between for partial truncations."""
        return 0.0 if self.exact else 1.0

    per_pass: ClassVar[str | None] = None
    """The constructor argument, if any, that sets how many of its repetitions run as one vectorized pass (forward's
    tangents, ES's particles). Left None by the user, it is the planner's choice (`pass_variants`)."""

    def per_pass_counts(self, loop: InnerLoop, meta: MetaParams) -> list[int]:
        """The repetitions per pass the planner may choose from, fewest (least memory) first; none by default."""
        return []

    @staticmethod
    def doubling(first: int, last: int) -> list[int]:
        """1, then `first`, 2 x `first`, 4 x `first`, ... below `last`, then `last`: the repetitions per pass a planner
        tries (one, all of them, and where all do not fit, the largest of the doublings that does)."""
        counts, count = [1], first
        while count < last:
            counts.append(count)
            count *= 2
        return sorted(set(counts + [last]))

    def pass_variants(self, loop: InnerLoop, meta: MetaParams) -> list["AbstractEstimator"]:
        """Where the repetitions per pass are left to the planner (`per_pass` argument None): one configuration per
        count of `per_pass_counts`, fewest first, which compute the same estimate (to rounding). Under
        `batching="auto"` the planner times the first against the last that fits and runs the faster by a margin;
        else the first. [] where there is nothing to choose
        (an estimator without repetitions, or a count the user set). Called directly, None runs one per pass."""
        if self.per_pass is None or getattr(self, self.per_pass) is not None:
            return []
        return [self.replaced(**{self.per_pass: n}) for n in self.per_pass_counts(loop, meta)]

    def replaced(self, **arguments: object) -> "AbstractEstimator":
        """A new estimator of this class with these constructor arguments changed (the others as this one's)."""
        return type(self)(**{**self.arguments(), **arguments})

    def candidates(self, loop: InnerLoop, meta: MetaParams, steps: int) -> list["AbstractEstimator"]:
        """What the planner may run for this estimator: itself (a planning policy such as `auto` lists more)."""
        return [self]

    def check(self, loop: InnerLoop, meta: MetaParams) -> None:
        """Raise `EstimatorUnsupported` (why, and what to use instead) before any work."""
        loop.check(meta)

    def vmap_blocker(self, loop: InnerLoop) -> str | None:
        """Why this estimator must not vmap over tasks with this loop, or None if it may."""
        if not self.supports_vmap:
            return f"estimator {self.name!r} cannot run under vmap"
        unsafe = loop.second_order_vmap_unsafe if self.second_order else []
        if unsafe:
            return (f"PyTorch computes second derivatives of {', '.join(unsafe)} wrongly under vmap "
                    "(functorch issue #534); use metaopt.models.BatchNorm, GroupNorm, or task-by-task batching")
        return None

    stacks: ClassVar[bool] = False
    """Whether `task_objective` may run on a `metaopt.stacked.StackedLoop` (all of a chunk's tasks at once on
    their task axis): estimators built on the loop's `init`, `unroll` and `outer_loss`, whose surrogate and outer
    loss then come out per task, [B] (all but online_pes and random forward;
    tests/test_stacked.py: equal to vmap across the kinds)."""

    def stacked_blocker(self, loop: InnerLoop, meta: MetaParams) -> str | None:
        """Why this estimator cannot run stacked with this loop and meta, or None if it may."""
        if not self.stacks:
            return f"estimator {self.name!r} does not run stacked"
        return stacked_blocker(loop, self.second_order)

    def stacked_slower(self, loop: InnerLoop, meta: MetaParams) -> str | None:
        """Why stacking is expected to be slower than vmap for this estimator here (then `batching="auto"`
        vmaps), or None: `metaopt.stacked.stacked_slower` (the compiled wrapper has its own reason)."""
        return stacked_slower(loop, meta)

    @abc.abstractmethod
    def task_objective(self, loop: InnerLoop, meta: MetaParams, task: Task,
                       guard: StepGuard | None) -> TaskObjective:
        """The surrogate and outer loss of one task (no task axis).

        `guard` (None when unlimited) must be passed as `on_step` to every unroll.
        """

    def predict_peak_bytes(self, measure: Measure, steps: int, probes: tuple[int, int] = (16, 64)) -> int:
        """Peak memory at T = `steps`, from `measure(t)`: the measured peak of this estimator at t steps
        (`measure(t, other)` measures another estimator instead).

        Default: linear in T (the cost of every estimator that keeps O(T) or O(1) graphs; even
        graph-free unrolls grow the process a little per step), from probes at `probes` steps:
        wide apart, because the heap grows in coarse increments that swamp a slope measured
        over a few steps. The planner refines a prediction with probes at T/4 and T/2 where
        that is affordable (`metaopt.prediction`); laws with their own probes ignore `probes`.
        """
        return linear_prediction(measure, steps, *probes)

    def predict_seconds(self, time_at: Callable[[int], float], steps: int) -> float:
        """Wall-clock seconds of a call at T = `steps`, from `time_at(t)`: the timed call at t steps.

        Default: linear in T (every estimator here runs O(T) inner steps, plus a part that does not grow with T:
        the outer loss, a linear solve), from timings at 16 and 64 steps (wide apart: the slope's noise is multiplied
        by (T - 64) / 48); at T <= 64, the call itself."""
        return linear_seconds(time_at, steps, 16, 64)

    def __call__(self, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                 budget: Budget | None = None, *, batching: Batching = "auto", chunk_size: int | None = None,
                 clock: Callable[[], float] | None = None,
                 memory_probe: Callable[[], int] | None = None) -> MetaGrad:
        """The meta-gradient of the mean outer loss over a batch of tasks: `metaopt.runner.run_meta_gradient`
        with this estimator (see there for the arguments)."""
        return run_meta_gradient(self, loop, meta, tasks, budget, batching=batching, chunk_size=chunk_size,
                                 clock=clock, memory_probe=memory_probe)

    def arguments(self) -> dict[str, object]:
        """The constructor's arguments that rebuild this estimator, read back from the attributes of the same names
        (not every attribute is one: `es` keeps PES's `k`, `forward` its `stochastic` flag).

        Raises:
          TypeError: an argument is kept under no attribute of its name (then no config can rebuild it).
        """
        names = [p.name for p in inspect.signature(type(self).__init__).parameters.values()
                 if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        missing = [name for name in names if not hasattr(self, name)]
        if missing:
            raise TypeError(f"{type(self).__name__} keeps no attribute for its argument(s) {missing}")
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.arguments().items())})"


class MetaGradientMethod(Protocol):
    """What the registry holds and training accepts: an estimator, or a planning policy such as `auto`
    (`metaopt.planning.Auto`) whose `candidates` are ranked estimators."""

    name: ClassVar[str]

    def check(self, loop: InnerLoop, meta: MetaParams) -> None: ...

    def candidates(self, loop: InnerLoop, meta: MetaParams, steps: int) -> list[AbstractEstimator]: ...

    def __call__(self, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task], budget: Budget | None = None,
                 *, batching: Batching = "auto", chunk_size: int | None = None,
                 clock: Callable[[], float] | None = None,
                 memory_probe: Callable[[], int] | None = None) -> MetaGrad: ...


_REGISTRY: dict[str, type] = {}
C = TypeVar("C", bound=type)


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make an estimator (or a planning policy) available as `get_estimator(name)`."""

    def add(cls: C) -> C:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"estimator name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return add


def available_estimators() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def registered_estimators() -> list[type[AbstractEstimator]]:
    """The registered estimator classes (planning policies left out), in name order."""
    return [cls for _, cls in sorted(_REGISTRY.items()) if issubclass(cls, AbstractEstimator)]


def get_estimator(name: str, compile: bool = False, **kwargs: object) -> MetaGradientMethod:
    """Build a registered estimator: `get_estimator("truncated", k=5)`, or the `auto` policy.

    With `compile=True`, the estimator wrapped in `metaopt.compiled.Compiled` (its vmapped chunks'
    meta-gradients as one compiled function; eager with a logged reason where that fails).

    Raises:
      UnknownEstimator: the name is not registered (the message lists those that are).
      EstimatorUnsupported: `compile=True` for a planning policy (compile the estimator it would choose).
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnknownEstimator(f"unknown estimator {name!r}; available: {', '.join(available_estimators())}") from None
    method = cls(**kwargs)
    if not compile:
        return method
    if not isinstance(method, AbstractEstimator):
        raise EstimatorUnsupported(f"compile=True needs an estimator; {name!r} is a planning policy (choose the "
                                   f"estimator, e.g. get_estimator('full', compile=True))")
    return cast(MetaGradientMethod, Compiled(method))
