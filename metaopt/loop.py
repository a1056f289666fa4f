"""The inner loop: one pure step `state_{t+1} = step(state_t, batch_t, meta)`.

An `InnerLoop` holds configuration only (a model, an inner optimizer, a loss);
tensors move through arguments and return values. The model is an ordinary
`nn.Module`, called with `torch.func.functional_call` on the inner parameters,
so it is never modified and never monkey-patched.

Meta-parameters plug into slots (see `metaopt.metaparams`):

- "init":      `initial_params()` gives the inner parameters at step 0 (MAML);
               without it, the model's own parameters (detached) are the start.
- "optimizer": `hyper()` overrides the inner optimizer's hyperparameters (learned lrs);
               `init_state`/`update` may replace the update rule (a learned optimizer).
- "loss":      `inner_loss(pred, batch, params, base_loss)` is the inner loss (not the outer one).
- "data":      `transform(batch)` is applied to each support batch before the step.

Buffers (BatchNorm running statistics) are explicit inner state: each forward
call runs on fresh copies, and the updated copies, detached, become the next
state's buffers, so the model's own buffers never change and a step that is
recomputed (checkpointing) cannot update them twice.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from metaopt.optim import InnerOptimizer
from metaopt.slots import DataSlot, InitSlot, LossSlot, OptimizerSlot
from metaopt.types import Batch, Buffers, Hyper, InnerState, LossFn, MetaParams, OptState, Params, Task

__all__ = ["InnerLoop", "unroll", "task_outer_loss", "detach_state", "call_module", "adapt_patterns", "adapted_names",
           "SLOTS"]

SLOTS = ("init", "optimizer", "loss", "data")

# Modules whose second derivatives PyTorch computes wrongly under vmap (the batching
# rule of their backward is wrong for grad_input: functorch issue #534, still open in
# torch 2.13). Measured: meta-gradients off by O(1) for parameters before the layer.
# GroupNorm and BatchNorm in eval mode are exact; metaopt.models.BatchNorm is too.
_SECOND_ORDER_VMAP_UNSAFE = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)

StepHook = Callable[[int, InnerState], None]


class InnerLoop:
    """Configuration of an inner training loop: `init`, `step`, `outer_loss`.

    Args:
      model: an ordinary module; only its structure (and, without an "init"
        meta-parameter, its current parameter values) is used.
      optimizer: a pure inner optimizer (`metaopt.optim`).
      loss_fn: the inner loss `loss(pred, y)`, also the outer loss unless
        `outer_loss_fn` is given.
      outer_loss_fn: the loss on the query batch after adaptation.
      proximal: lambda of iMAML's proximal term (Rajeswaran et al. 2019): the inner
        objective becomes inner_loss + lambda/2 ||params - params_0||^2, which makes
        the inner solution depend smoothly on the initialization params_0. 0: none.
      adapt: the parameters the inner steps train, as module paths ("head" is `head.weight` and `head.bias`;
        an exact parameter name works too); the others are held at their initial values in every inner
        step: no inner gradient is taken for them and the inner optimizer keeps no state for them, yet the
        outer loss still depends on them (directly and through the adapted ones), so an initialization
        meta-learns them too. `["head"]` on `Conv4` is ANIL (Raghu et al. 2020: almost no inner loop),
        `["features"]` BOIL (Oh et al. 2021: body only). None: every parameter (MAML).
    """

    def __init__(self, model: nn.Module, optimizer: InnerOptimizer, loss_fn: LossFn,
                 outer_loss_fn: LossFn | None = None, proximal: float = 0.0, adapt: Sequence[str] | None = None):
        if proximal < 0:
            raise ValueError(f"InnerLoop: proximal must be >= 0, got {proximal}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.outer_loss_fn = outer_loss_fn if outer_loss_fn is not None else loss_fn
        self.proximal = proximal
        self.param_shapes = {k: p.shape for k, p in model.named_parameters()}
        self.adapt = self._checked_adapt(adapt)
        # The names themselves, matched once here: the inner step selects by membership, no pattern matching.
        self.adapted_keys = None if self.adapt is None else frozenset(adapted_names(self.adaptable_names(), self.adapt))

    def adaptable_names(self) -> list[str]:
        """The names of the parameters an inner step may train (`adapt` selects among them)."""
        return list(self.param_shapes)

    def _checked_adapt(self, adapt: Sequence[str] | None) -> tuple[str, ...] | None:
        patterns = adapt_patterns(adapt)
        if patterns is None:
            return None
        names = self.adaptable_names()
        if not patterns:
            raise ValueError("InnerLoop: adapt=[] would train no parameter in the inner loop; name the module paths "
                             "to adapt (e.g. ['head']), or adapt=None for every parameter")
        unmatched = [p for p in patterns if not adapted_names(names, (p,))]
        if unmatched:
            raise ValueError(f"InnerLoop: adapt={list(patterns)}: {unmatched} name no parameter of "
                             f"{type(self.model).__name__}; its parameters are {names}")
        return patterns

    def adapted(self, params: Params) -> Params:
        """The entries of `params` that the inner steps train (all of them without `adapt`)."""
        if self.adapted_keys is None:
            return params
        return {k: v for k, v in params.items() if k in self.adapted_keys}

    def with_adapted(self, params: Params, trained: Params) -> Params:
        """`params` with the trained entries replaced (in `params`' order; held ones as they are)."""
        if self.adapted_keys is None:
            return trained
        return {k: trained.get(k, v) for k, v in params.items()}

    @property
    def second_order_vmap_unsafe(self) -> list[str]:
        """Names of the model's modules whose second derivatives are wrong under vmap.

        Estimators that differentiate through inner gradients run such a model task
        by task instead (see `AbstractEstimator.vmap_blocker`).
        """
        return [name for name, m in self.model.named_modules()
                if isinstance(m, _SECOND_ORDER_VMAP_UNSAFE)
                and not (isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training)]

    def __repr__(self) -> str:
        return (f"InnerLoop(model={type(self.model).__name__}, optimizer={self.optimizer.name}, "
                f"loss_fn={getattr(self.loss_fn, '__name__', self.loss_fn)})")

    def check(self, meta: MetaParams) -> None:
        """Raise ValueError if `meta` has an unknown slot or an init of the wrong shapes."""
        unknown = set(meta.keys()) - set(SLOTS)
        if unknown:
            raise ValueError(f"unknown meta-parameter slot(s) {sorted(unknown)}; slots are {SLOTS}")
        if "init" in meta:
            shapes = {k: v.shape for k, v in cast(InitSlot, meta["init"]).initial_params().items()}
            if shapes != self.param_shapes:
                raise ValueError(f"meta 'init' gives parameters {shapes} but the model has "
                                 f"{self.param_shapes}")

    def init(self, meta: MetaParams, start: Params | None = None) -> InnerState:
        """The state at step 0: initial parameters, the model's buffers, fresh optimizer state.

        Args:
          meta: the meta-parameters; an "init" one gives the initial parameters.
          start: a task's own initial parameters (`Task.init`), used when there is no
            "init" meta-parameter; without either, the model's own parameters (detached).

        Raises:
          ValueError: both an "init" meta-parameter and a task initialization are given.
        """
        if "init" in meta:
            if start is not None:
                raise ValueError("the task carries its own initialization (Task.init) but the meta-parameters "
                                 "learn one (slot 'init'): drop one of them")
            params = cast(InitSlot, meta["init"]).initial_params()
        elif start is not None:
            params = dict(start)
        else:
            params = {k: p.detach() for k, p in self.model.named_parameters()}
        buffers = {k: b.detach() for k, b in self.model.named_buffers()}
        anchor = params if self.proximal else {}
        return InnerState(params, buffers, self.optimizer_init(meta, params), anchor)

    def forward(self, params: Params, buffers: Buffers, x: Tensor) -> tuple[Tensor, Buffers]:
        """Run the model on `x` with the given parameters and buffers.

        Returns the prediction and the (detached) buffers after the call.
        """
        return call_module(self.model, params, buffers, x)

    def optimizer_init(self, meta: MetaParams, params: Params) -> OptState:
        """The inner optimizer's state at step 0 (a learned optimizer's hidden state, momenta, ...), for the
        parameters the inner steps train."""
        params = self.adapted(params)
        if "optimizer" in meta:
            return cast(OptimizerSlot, meta["optimizer"]).init_state(self.optimizer, params)
        return self.optimizer.init(params)

    def hyper(self, meta: MetaParams) -> Hyper:
        """The optimizer hyperparameters that the "optimizer" meta-parameter sets ({} if none)."""
        return cast(OptimizerSlot, meta["optimizer"]).hyper() if "optimizer" in meta else {}

    def support_batch(self, batch: Batch, meta: MetaParams) -> Batch:
        """The batch an inner step trains on: the "data" slot's transform of the support batch (augmented or
        synthetic data), or the batch itself. The only place that reads the data slot."""
        return cast(DataSlot, meta["data"]).transform(batch) if "data" in meta else batch

    def inner_objective(self, params: Params, state: InnerState, batch: Batch,
                        meta: MetaParams) -> tuple[Tensor, Buffers]:
        """The inner loss of `params` on one (already transformed) batch, and the buffers after it.

        Uses the "loss" meta-parameter if present, and adds the proximal term
        lambda/2 ||params - state.anchor||^2 when the loop has one.
        """
        pred, buffers = self.forward(params, state.buffers, batch.x)
        if "loss" in meta:
            loss = cast(LossSlot, meta["loss"]).inner_loss(pred, batch, params, self.loss_fn)
        else:
            loss = self.loss_fn(pred, batch.y)
        if self.proximal:
            loss = loss + 0.5 * self.proximal * sum(((p - state.anchor[k]) ** 2).sum()
                                                    for k, p in self.adapted(params).items())
        return loss, buffers

    def step(self, state: InnerState, batch: Batch, meta: MetaParams, *, create_graph: bool = True,
             hyper: Hyper | None = None) -> InnerState:
        """One inner step. Pure: returns a new state.

        Args:
          state: the current inner state.
          batch: the support batch of this step.
          meta: the meta-parameters.
          create_graph: if False, the inner gradient is detached, so the step is
            differentiable only through the update itself (first-order MAML:
            d params_{t+1} / d params_t = I, d params_{t+1} / d lr = -grad).
          hyper: the optimizer hyperparameters, if already computed (`unroll`
            computes them once for all steps).

        The inner gradient is `torch.func.grad`'s, which composes with vmap and jvp
        (batched tasks, forward mode); it is taken for the adapted parameters only (`adapt`).
        """
        batch = self.support_batch(batch, meta)

        def objective(trained: Params) -> tuple[Tensor, Buffers]:
            return self.inner_objective(self.with_adapted(state.params, trained), state, batch, meta)

        trained = self.adapted(state.params)
        grads, buffers = torch.func.grad(objective, has_aux=True)(trained)
        if not create_graph:
            grads = {k: g.detach() for k, g in grads.items()}
        if hyper is None:
            hyper = self.hyper(meta)
        if "optimizer" in meta:
            params, opt_state = cast(OptimizerSlot, meta["optimizer"]).update(
                self.optimizer, trained, grads, state.opt_state, hyper)
        else:
            params, opt_state = self.optimizer.update(trained, grads, state.opt_state, hyper)
        return InnerState(self.with_adapted(state.params, params), buffers, opt_state, state.anchor)

    def predict(self, state: InnerState, x: Tensor) -> Tensor:
        """The adapted model's prediction on `x` (buffers are not updated)."""
        return self.forward(state.params, state.buffers, x)[0]

    def outer_loss(self, state: InnerState, batch: Batch, meta: MetaParams) -> Tensor:
        """The loss of the adapted parameters on the query batch (a scalar)."""
        return self.outer_loss_fn(self.predict(state, batch.x), batch.y)


def unroll(loop: InnerLoop, state: InnerState, batches: Iterable[Batch], meta: MetaParams, *,
           create_graph: bool = True,
           on_step: StepHook | None = None) -> InnerState:
    """Run one inner step per batch; the only loop over inner steps.

    Args:
      loop, state, meta: as in `InnerLoop.step`.
      batches: one support batch per step.
      create_graph: as in `InnerLoop.step`.
      on_step: called as `on_step(t, state)` after step t (0-based), e.g. by a
        budget guard that stops at a step boundary by raising.

    Returns:
      The state after the last step.
    """
    hyper = loop.hyper(meta)
    for t, batch in enumerate(batches):
        state = loop.step(state, batch, meta, create_graph=create_graph, hyper=hyper)
        if on_step is not None:
            on_step(t, state)
    return state


def task_outer_loss(loop: InnerLoop, meta: MetaParams, task: Task, *, create_graph: bool = True,
                    on_step: StepHook | None = None) -> Tensor:
    """outer_loss(step^T(init(meta))): adapt on the task's support batches, score on its query batch."""
    state = unroll(loop, loop.init(meta, task.init), task.support, meta, create_graph=create_graph,
                   on_step=on_step)
    return loop.outer_loss(state, task.query, meta)


def call_module(module: nn.Module, params: Params, buffers: Buffers, x: Tensor,
                **kwargs: object) -> tuple[Tensor, Buffers]:
    """`module` on `x` (and keyword arguments of its forward, e.g. `embed=True`) with the given parameters and
    buffers: the prediction and the (detached) buffers after the call. The module itself is not modified."""
    if not buffers:
        return functional_call(module, params, (x,), kwargs), buffers
    # Modules update buffers in place (BatchNorm). Under vmap, x is batched but a plain
    # copy of an unbatched buffer would not be, and vmap forbids writing batched values
    # into it; adding a zero taken from x gives each task its own copy (a new tensor).
    zero = torch.zeros_like(x.reshape(-1)[0])
    fresh = {k: b + zero.to(b.dtype) for k, b in buffers.items()}
    pred = functional_call(module, (params, fresh), (x,), kwargs)
    return pred, {k: b.detach() for k, b in fresh.items()}


def adapt_patterns(adapt: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """`adapt` (a list of module paths, from Python or a config) as a tuple; one string is one path; None stays."""
    if adapt is None:
        return None
    return (adapt,) if isinstance(adapt, str) else tuple(str(a) for a in adapt)


def adapted_names(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The names (in their order) that one of `patterns` names: the parameter itself, or a module path above it
    ("head" names "head.weight"; "features.0" names "features.0.weight", not "features.01.weight")."""
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in patterns)]


def detach_state(state: InnerState) -> InnerState:
    """A copy of `state` with every tensor detached: no path leads back to the meta-parameters."""
    return tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, state)
