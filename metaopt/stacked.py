"""Stacked batching: a batch of tasks' inner loops run once on the task axis, without `torch.func.vmap`.

Under vmap every op of the per-task function goes through functorch's batching rules and every inner
gradient through its `grad` transform: per-op costs that dominate small models (the sinusoid MLP's
meta-gradient is ~1000 dispatches). Stacked batching runs the same computation as ordinary batched
tensor code instead:

- the inner parameters carry the task axis, [B, *shape] (the meta-parameters' initialization expanded);
- the model runs on them through *stacked layers* (`stacked_forward`): a linear layer is one `baddbmm`
  over the tasks, a convolution one grouped convolution (a `MatmulConv2d` one batched GEMM), a BatchNorm
  one `batch_norm` over the tasks' channels (per-task statistics). A module without a stacked rule runs
  under vmap (correct, not faster);
- the inner gradient is `torch.autograd.grad` of the *sum* of the tasks' inner losses: tasks share no
  tensor, so d(sum_b L_b)/d params_b = dL_b/d params_b, each task's own gradient;
- built-in optimizers step all tasks at once (elementwise: `InnerOptimizer.elementwise`), and `mse` and
  `cross_entropy` give each task's loss directly (`metaopt.losses.per_task`); the per-task pieces it does not
  know (another loss, a learned loss, a learned update rule, a data transform) run under vmap, as the
  per-task function would, paying vmap's fixed cost per call at every step (`stacked_slower`);
- rows may carry their own meta-values (`StackedLoop(row_meta=...)`): evolution strategies perturb the
  meta-parameters per task and per particle, and run a pass of particles as one unroll of particles x tasks rows.

It computes what vmap computes, up to floating-point rounding (tests/test_stacked.py: float64, every
stacked estimator and meta-parameter kind, against vmap and task by task). It is also exact where vmap is
not: PyTorch's fused BatchNorm has wrong second derivatives under vmap (functorch issue #534), but in
ordinary autograd they are right, so `nn.BatchNorm2d` stacks for second-order MAML.

Register a rule for your own module with `stacked_rule(MyModule)`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.loop import InnerLoop, call_module
from metaopt.metacall import call_with_meta
from metaopt.models import MLP, BatchNorm, Conv4, MatmulConv2d
from metaopt.losses import per_task
from metaopt.optim import hyper_for
from metaopt.slots import DataSlot, InitSlot, LossSlot, OptimizerSlot
from metaopt.types import Batch, Buffers, Hyper, InnerState, MetaParams, Params

__all__ = ["StackedLoop", "stacked_forward", "stacked_rule", "stacked_blocker", "stacked_slower", "unstacked_modules"]

Rule = Callable[["_Call", nn.Module, str, Tensor], Tensor]
"""rule(call, module, prefix, x) -> y: the module on x [B, n, ...] with the stacked parameters
`call.params[prefix + name]` ([B, *shape]); writes updated buffers into `call.buffers`."""

_RULES: dict[type, Rule] = {}


def stacked_rule(*types: type) -> Callable[[Rule], Rule]:
    """Decorator: `rule` runs modules of `types` (exactly these classes, not subclasses) on stacked parameters."""

    def add(rule: Rule) -> Rule:
        for t in types:
            _RULES[t] = rule
        return rule

    return add


class _Call:
    """One stacked forward call: the stacked parameters, and the buffers (updated as modules run)."""

    def __init__(self, params: Params, buffers: Buffers):
        self.params, self.buffers = params, dict(buffers)

    def run(self, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
        rule = _rule_for(module)
        return self.vmapped(module, prefix, x) if rule is None else rule(self, module, prefix, x)

    def vmapped(self, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
        """A module without a stacked rule: the per-task call under vmap."""
        params = {k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)}
        buffers = {k[len(prefix):]: v for k, v in self.buffers.items() if k.startswith(prefix)}
        y, new = torch.func.vmap(lambda p, b, x: call_module(module, p, b, x), randomness="different")(
            params, buffers, x)
        self.buffers.update({prefix + k: v for k, v in new.items()})
        return y


def _rule_for(module: nn.Module) -> Rule | None:
    """The module's stacked rule, or None (it runs under vmap). A BatchNorm with a cumulative average
    (momentum None) has none: its buffer update needs the count."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
        return None
    return _RULES.get(type(module))


def stacked_forward(model: nn.Module, params: Params, buffers: Buffers, x: Tensor) -> tuple[Tensor, Buffers]:
    """The model of every task on its own input: x [B, n, ...] with params [B, *shape] -> ([B, n, ...], buffers).

    Buffers ([B, *shape]) are returned updated (BatchNorm running statistics), detached; the inputs are
    not modified."""
    call = _Call(params, buffers)
    y = call.run(model, "", x)
    return y, {k: v.detach() for k, v in call.buffers.items()}


def unstacked_modules(model: nn.Module) -> list[str]:
    """Names of the modules a stacked forward runs under vmap (no stacked rule), outermost only ("": the
    model itself)."""
    names: list[str] = []

    def visit(module: nn.Module, name: str) -> None:
        rule = _rule_for(module)
        if rule is None:
            names.append(name)
        elif rule in _CONTAINERS:
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return names


def stacked_blocker(loop: InnerLoop, second_order: bool) -> str | None:
    """Why `loop` cannot run stacked, or None. `StackedLoop` is an `InnerLoop`'s stacked form, so a subclass
    with its own methods (`PrototypeLoop`, `ProtoMAMLLoop`) does not stack. Modules without a stacked rule run
    under vmap, so a second-order estimator cannot run stacked where such a module holds one that vmap
    differentiates wrongly twice (`InnerLoop.second_order_vmap_unsafe`)."""
    if type(loop) is not InnerLoop:
        return f"the inner loop is a {type(loop).__name__}, with methods of its own (stacked runs InnerLoop's)"
    if not second_order:
        return None
    unsafe = loop.second_order_vmap_unsafe  # usually empty: then no second walk of the model (every meta-step)
    unstacked = unstacked_modules(loop.model) if unsafe else []
    wrong = [u for u in unsafe if any(f == "" or u == f or u.startswith(f + ".") for f in unstacked)]
    if wrong:
        return (f"{', '.join(wrong)} would run under vmap (no stacked rule), whose second derivatives PyTorch "
                "computes wrongly there (functorch issue #534)")
    return None


@stacked_rule(nn.Sequential)
def _sequential(call: _Call, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
    for name, child in module.named_children():
        x = call.run(child, f"{prefix}{name}.", x)
    return x


@stacked_rule(MLP)
def _mlp(call: _Call, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
    return call.run(cast(MLP, module).net, prefix + "net.", x)


@stacked_rule(Conv4)
def _conv4(call: _Call, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
    conv4 = cast(Conv4, module)
    return call.run(conv4.head, prefix + "head.", call.run(conv4.features, prefix + "features.", x))


@stacked_rule(nn.Linear)
def _linear(call: _Call, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
    weight = call.params[prefix + "weight"]  # [B, out, in]
    bias = call.params.get(prefix + "bias")  # [B, out]
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    if bias is None:
        y = torch.bmm(rows, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
    return y.reshape(*x.shape[:-1], weight.shape[1])


def _tasks_as_channels(x: Tensor) -> Tensor:
    """[B, n, C, *spatial] -> [n, B*C, *spatial]: each task's channels side by side."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _channels_as_tasks(y: Tensor, tasks: int) -> Tensor:
    """Inverse of `_tasks_as_channels`: [n, B*C, *spatial] -> [B, n, C, *spatial]."""
    return y.reshape(y.shape[0], tasks, -1, *y.shape[2:]).transpose(0, 1)


@stacked_rule(nn.Conv2d)
def _conv2d(call: _Call, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
    conv = cast(nn.Conv2d, module)
    if conv.padding_mode != "zeros" or x.dim() != 5:
        return call.vmapped(module, prefix, x)
    weight = call.params[prefix + "weight"]  # [B, out, in / groups, k, k]
    bias = call.params.get(prefix + "bias")
    tasks = x.shape[0]
    y = F.conv2d(_tasks_as_channels(x), weight.reshape(-1, *weight.shape[2:]),
                 None if bias is None else bias.reshape(-1), conv.stride, conv.padding, conv.dilation,
                 conv.groups * tasks)
    return _channels_as_tasks(y, tasks)


@stacked_rule(MatmulConv2d)
def _matmul_conv2d(call: _Call, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
    """Each task's patch rows times its own weight matrix: one `bmm` over the tasks."""
    conv = cast(MatmulConv2d, module)
    weight = call.params[prefix + "weight"].permute(0, 3, 4, 2, 1).flatten(1, 3)  # [B, kh*kw*C, out]
    bias = call.params.get(prefix + "bias")  # [B, out]
    tasks, n = x.shape[:2]
    rows, height, width = conv.patch_rows(x.flatten(0, 1))
    rows = rows.reshape(tasks, -1, rows.shape[-1])  # [B, n*H'*W', kh*kw*C]
    y = torch.bmm(rows, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), rows, weight)
    return y.reshape(tasks, n, height, width, -1).permute(0, 1, 4, 2, 3)


@stacked_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNorm)
def _batch_norm(call: _Call, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
    """Per-task statistics as `batch_norm` over the tasks' channels side by side. Its second derivatives are
    exact in ordinary autograd (functorch issue #534 is vmap's batching rule), so the fused kernel serves
    second-order MAML here, for `nn.BatchNorm*d` and `metaopt.models.BatchNorm` alike (the same function)."""
    norm = cast(Any, module)
    tasks = x.shape[0]
    weight, bias = call.params.get(prefix + "weight"), call.params.get(prefix + "bias")
    tracked = norm.track_running_stats
    use_batch_stats = norm.training or not tracked
    mean = var = None
    if tracked:
        mean = call.buffers[prefix + "running_mean"].reshape(-1).clone()
        var = call.buffers[prefix + "running_var"].reshape(-1).clone()
    y = F.batch_norm(_tasks_as_channels(x), mean, var, None if weight is None else weight.reshape(-1),
                     None if bias is None else bias.reshape(-1), use_batch_stats, norm.momentum, norm.eps)
    if tracked and norm.training:  # batch_norm updated the copies in place
        call.buffers[prefix + "running_mean"] = cast(Tensor, mean).reshape(tasks, -1)
        call.buffers[prefix + "running_var"] = cast(Tensor, var).reshape(tasks, -1)
        count = prefix + "num_batches_tracked"
        call.buffers[count] = call.buffers[count] + 1
    return _channels_as_tasks(y, tasks)


@stacked_rule(nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softplus, nn.Identity)
def _elementwise(call: _Call, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
    return cast(Tensor, module(x))


@stacked_rule(nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
def _per_example(call: _Call, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
    """A parameter-free module that treats every example alike: the tasks' examples as one batch."""
    y = module(x.flatten(0, 1))
    return y.reshape(*x.shape[:2], *y.shape[1:])


@stacked_rule(nn.Flatten)
def _flatten(call: _Call, module: nn.Module, prefix: str, x: Tensor) -> Tensor:
    flatten = cast(nn.Flatten, module)
    start = flatten.start_dim + 1 if flatten.start_dim >= 0 else flatten.start_dim
    end = flatten.end_dim + 1 if flatten.end_dim >= 0 else flatten.end_dim
    return x.flatten(start, end)


_CONTAINERS = (_sequential, _mlp, _conv4)


def _steps_all_tasks_at_once(loop: InnerLoop, meta: MetaParams) -> bool:
    """Whether the loop's optimizer (and the "optimizer" meta-parameter) are elementwise, so one update steps
    every task of the task axis."""
    return loop.optimizer.elementwise and ("optimizer" not in meta or getattr(meta["optimizer"], "elementwise", False))


def stacked_slower(loop: InnerLoop, meta: MetaParams) -> str | None:
    """Why stacking is expected to be slower than vmap here (so `batching="auto"` vmaps), or None.

    Each per-task piece a stacked step runs under vmap costs vmap's fixed setup per call (~0.4 ms on the CPU)
    at every inner step, where a vmapped unroll pays it once: a data transform and a learned update rule are
    such pieces (sinusoid MLP, 16 tasks, T=20: stacked 0.80x vmap's speed with synthetic data, 0.94x with a
    learned LSTM optimizer; 1.4x faster with an initialization or a learned loss). Speed only: an explicit
    `batching="stacked"` runs them, exactly."""
    if "data" in meta:
        return "a data transform runs under vmap at every stacked step"
    if not _steps_all_tasks_at_once(loop, meta):
        return "the update rule runs under vmap at every stacked step"
    return None


def _inside_jvp() -> bool:
    """Whether `torch.func.jvp` is the innermost transform (forward mode): `torch.autograd.grad` cannot run inside
    it (functorch refuses `requires_grad_` there), so a stacked step takes `torch.func.grad`; inside `vjp`
    (checkpoint's pullbacks) autograd's works and is the faster (about 10% on the sinusoid at T=20, measured
    once)."""
    interpreter = torch._C._functorch.peek_interpreter_stack()
    return interpreter is not None and interpreter.key() == torch._C._functorch.TransformType.Jvp


class StackedLoop(InnerLoop):
    """An `InnerLoop` over a batch of B tasks on their task axis (see the module docstring).

    Its states carry the task axis ([B, *shape] parameters, buffers and optimizer states) and its losses
    are per task, [B]; `step` and `outer_loss` compute what the loop's vmapped versions would. Built by
    the runner for one vmapped chunk; an estimator that declares `stacks = True` runs on it unchanged.

    Rows with their own meta-values (`row_meta`): evolution strategies perturb the meta-parameters per task and
    per particle, so each row of the axis (a task, or a particle of a task) runs at its own point. Every read of a
    meta-parameter then maps over the rows (`torch.func.vmap` of `call_with_meta` at each row's values): the
    initialization and the optimizer's hyperparameters once per unroll, a learned loss, update rule or data
    transform at every step (as without `row_meta`, where they run under vmap too); the rest of the step is the
    stacked code above, unchanged.

    Args:
      loop: the inner loop of one task.
      tasks: B, the rows of the axis.
      functional: take inner gradients with `torch.func.grad` (composes with an outer `torch.func` transform
        and traces under `torch.compile`: `metaopt.compiled`) instead of `torch.autograd.grad` (faster eager);
        inside `torch.func.jvp` (forward mode) the step takes `torch.func.grad` whatever this says.
      row_meta: each row's meta-values, {name: [B, *shape]} keyed as `meta_values` (None: every row at meta's own
        values, the initialization expanded).
    """

    def __init__(self, loop: InnerLoop, tasks: int, functional: bool = False,
                 row_meta: dict[str, Tensor] | None = None):
        # Not super().__init__ (it would re-walk the model's parameters at every call): the configuration only.
        self.model, self.optimizer, self.loss_fn = loop.model, loop.optimizer, loop.loss_fn
        self.outer_loss_fn, self.proximal, self.param_shapes = loop.outer_loss_fn, loop.proximal, loop.param_shapes
        self.adapt, self.adapted_keys = loop.adapt, loop.adapted_keys
        self.tasks, self.functional, self.row_meta = tasks, functional, row_meta

    def per_row(self, meta: MetaParams, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(meta, *args)` row by row, each row at its own meta-values (`row_meta`), vmapped over the rows (the
        arguments carry the row axis first): the one way a row-meta loop reads a meta-parameter."""
        assert self.row_meta is not None
        return torch.func.vmap(lambda values, *a: call_with_meta(meta, values, fn, *a), randomness="different")(
            self.row_meta, *args)

    def init(self, meta: MetaParams, start: Params | None = None) -> InnerState:
        """Every task's state at step 0: one task's parameters expanded to [B, ...], or each task's own
        `start`; the optimizer's state for the stacked parameters."""
        one = super().init(meta, None if start is None else {k: v[0] for k, v in start.items()})  # checks
        params = {k: v.expand(self.tasks, *v.shape) for k, v in one.params.items()} if start is None else dict(start)
        if self.row_meta is not None and "init" in meta:
            params = self.per_row(meta, lambda m: cast(InitSlot, m["init"]).initial_params())
        buffers = {k: v.expand(self.tasks, *v.shape) for k, v in one.buffers.items()}
        if _steps_all_tasks_at_once(self, meta):  # an elementwise slot's state is its optimizer's: no meta read
            opt_state = self.optimizer_init(meta, params)
        elif self.row_meta is not None:
            opt_state = self.per_row(meta, lambda m, p: self.optimizer_init(m, p), params)
        else:
            opt_state = torch.func.vmap(lambda p: self.optimizer_init(meta, p))(params)
        return InnerState(params, buffers, opt_state, params if self.proximal else {})

    def forward(self, params: Params, buffers: Buffers, x: Tensor) -> tuple[Tensor, Buffers]:
        return stacked_forward(self.model, params, buffers, x)

    def support_batch(self, batch: Batch, meta: MetaParams) -> Batch:
        if "data" not in meta:
            return batch
        if self.row_meta is not None:
            return cast(Batch, self.per_row(meta, lambda m, b: cast(DataSlot, m["data"]).transform(b), batch))
        transform = cast(DataSlot, meta["data"]).transform
        return cast(Batch, torch.func.vmap(transform, randomness="different")(batch))

    def hyper(self, meta: MetaParams) -> Hyper:
        """The optimizer's hyperparameters. With `row_meta`, each row's (`per_row`), as one entry per parameter that
        broadcasts against its stacked tensors: [B, 1, ..., 1] for a rate per tensor, [B, *shape] per element (a [B]
        value left as it is would broadcast against a parameter's last axis). `unroll` computes them once."""
        if self.row_meta is None or "optimizer" not in meta:
            return super().hyper(meta)
        rows = cast(Hyper, self.per_row(meta, lambda m: InnerLoop.hyper(self, m)))

        def on_rows(value: Tensor, name: str) -> Tensor:
            rank = len(self.param_shapes[name])
            return value.reshape(value.shape[0], *[1] * (rank - value.dim() + 1), *value.shape[1:])
        names = [n for n in self.param_shapes if self.adapted_keys is None or n in self.adapted_keys]
        return {key: {name: on_rows(cast(Tensor, hyper_for(value, name)), name) for name in names}
                for key, value in rows.items()}

    def inner_objective(self, params: Params, state: InnerState, batch: Batch,
                        meta: MetaParams) -> tuple[Tensor, Buffers]:
        """Each task's inner loss, [B], and the buffers after the forward."""
        pred, buffers = self.forward(params, state.buffers, batch.x)
        if "loss" in meta and self.row_meta is not None:
            losses = self.per_row(meta, lambda m, q, b, p: cast(LossSlot, m["loss"]).inner_loss(q, b, p, self.loss_fn),
                                  pred, batch, params)
        elif "loss" in meta:
            inner_loss = cast(LossSlot, meta["loss"]).inner_loss
            losses = torch.func.vmap(lambda q, b, p: inner_loss(q, b, p, self.loss_fn))(pred, batch, params)
        else:
            losses = per_task(self.loss_fn, pred, batch.y)
        if self.proximal:
            losses = losses + 0.5 * self.proximal * sum(
                ((p - state.anchor[k]) ** 2).flatten(1).sum(1) for k, p in self.adapted(params).items())
        return losses, buffers

    def step(self, state: InnerState, batch: Batch, meta: MetaParams, *, create_graph: bool = True,
             hyper: Hyper | None = None) -> InnerState:
        """Every task's inner step: the gradient of the summed inner losses is each task's own (tasks share
        no tensor), taken with `torch.autograd.grad`, cheaper than vmap over `torch.func.grad`."""
        batch = self.support_batch(batch, meta)
        trained = self.adapted(state.params)
        if self.functional or _inside_jvp():
            def objective(params: Params) -> tuple[Tensor, Buffers]:
                losses, buffers = self.inner_objective(self.with_adapted(state.params, params), state, batch, meta)
                return losses.sum(), buffers

            grads, buffers = torch.func.grad(objective, has_aux=True)(trained)
            if not create_graph:
                grads = {k: g.detach() for k, g in grads.items()}
        else:
            # Under no_grad (a graph-free unroll) every parameter becomes a fresh leaf: a view taken there of one that
            # requires grad (the initialization expanded) says requires_grad but is not in any graph.
            tracked = torch.is_grad_enabled()
            params = {k: p if p.requires_grad and tracked else p.detach().requires_grad_() for k, p in trained.items()}
            # The gradients' own graph serves the outer gradient only where the inner objective reads a tensor in the
            # outer graph; through fresh leaves alone (the state after truncated's cut) it would be built and unused.
            graph = create_graph and tracked and self._objective_in_graph(state, batch, meta)
            with torch.enable_grad():
                losses, buffers = self.inner_objective(self.with_adapted(state.params, params), state, batch, meta)
                grads = dict(zip(params, torch.autograd.grad(losses.sum(), list(params.values()),
                                                             create_graph=graph)))
        if hyper is None:
            hyper = self.hyper(meta)
        update: Callable[[Params, Params, Any, Hyper], tuple[Params, Any]] = self.optimizer.update
        if "optimizer" in meta:
            update = functools.partial(cast(OptimizerSlot, meta["optimizer"]).update, self.optimizer)
        if _steps_all_tasks_at_once(self, meta):
            new_params, opt_state = update(trained, grads, state.opt_state, hyper)
        elif self.row_meta is not None and "optimizer" in meta:
            new_params, opt_state = self.per_row(
                meta, lambda m, p, g, s, h: cast(OptimizerSlot, m["optimizer"]).update(self.optimizer, p, g, s, h),
                trained, grads, state.opt_state, hyper)
        else:
            new_params, opt_state = torch.func.vmap(lambda p, g, s: update(p, g, s, hyper))(
                trained, grads, state.opt_state)
        return InnerState(self.with_adapted(state.params, new_params), buffers, opt_state, state.anchor)

    @staticmethod
    def _objective_in_graph(state: InnerState, batch: Batch, meta: MetaParams) -> bool:
        """Whether `inner_objective` reads a tensor that is in the outer graph: a parameter, the proximal anchor,
        the (transformed) support batch, or a learned loss (taken to be)."""
        # Every inner step asks: lazily, most likely first (a parameter in the graph), building nothing.
        return (any(p.requires_grad for p in state.params.values()) or "loss" in meta or batch.x.requires_grad
                or batch.y.requires_grad or any(a.requires_grad for a in state.anchor.values()))

    def outer_loss(self, state: InnerState, batch: Batch, meta: MetaParams) -> Tensor:
        """Each task's outer loss, [B]."""
        return per_task(self.outer_loss_fn, self.predict(state, batch.x), batch.y)
