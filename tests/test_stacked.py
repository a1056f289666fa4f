"""Stacked batching (`metaopt.stacked`): a chunk of tasks run on their task axis computes what vmap and task by
task compute, for every meta-parameter kind, optimizer and layer it serves, in float64; where it cannot serve,
it says why and `auto` runs something that can."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import metaopt as mo
from metaopt.estimators.base import registered_estimators
from metaopt.losses import per_task
from metaopt.metacall import meta_values
from metaopt.stacked import StackedLoop, stacked_forward, unstacked_modules
from problems import META_KINDS, OPTIMIZERS, tiny_model, tiny_tasks

T = 2


def _assert_same(result: mo.MetaGrad, reference: mo.MetaGrad, rtol: float = 1e-10) -> None:
    torch.testing.assert_close(result.task_losses, reference.task_losses, rtol=rtol, atol=1e-12)
    assert set(result.grads) == set(reference.grads)
    assert sum(g.abs().sum() for g in reference.grads.values()) > 0, "a zero reference cannot tell estimators apart"
    for k, g in reference.grads.items():
        torch.testing.assert_close(result.grads[k], g, rtol=rtol, atol=1e-12, msg=f"gradient of {k}")


# The estimators that stack, as they run here: truncated with its graph-free prefix (k < T), checkpoint with one
# pullback per segment of one step; reptile, which serves only an initialization, with its graph-free unroll;
# forward (exact: a jvp per meta-parameter scalar, inside which the stacked steps take functional gradients);
# implicit (with a proximal term, so that an initialization has an implicit gradient: per-task CG solves);
# es and pes (rows at their own perturbed meta-values; each call a fresh estimator, so both draw the same noise:
# one draw of [B, *shape] stacked is what vmap's "different" randomness draws for B tasks).
STACKING = {"full": mo.Full, "first_order": mo.FirstOrder, "truncated": lambda: mo.Truncated(k=1),
            "checkpoint": lambda: mo.Checkpoint(segment=1), "reptile": mo.Reptile, "forward": mo.ForwardMode,
            "implicit": mo.Implicit, "es": lambda: mo.EvolutionStrategies(population=4),
            "pes": lambda: mo.PersistentES(population=4, k=1)}
SERVES = {"reptile": lambda kind: kind == "init",  # the kinds an estimator serves, where not all
          "implicit": lambda kind: "lrs" not in kind and "learned_optimizer" not in kind}  # no update rule


def test_every_estimator_that_declares_stacks_is_tested_stacked():
    assert {cls.name for cls in registered_estimators() if cls.stacks} == set(STACKING)


@pytest.mark.parametrize("name,kind", [
    pytest.param(name, kind, marks=[pytest.mark.slow] if (name, kind) == ("forward", "learned_optimizer_lstm") else [])
    for name in sorted(STACKING) for kind in sorted(META_KINDS)  # forward on the LSTM: 138 jvps, 14 s
    if SERVES.get(name, lambda kind: True)(kind)])
def test_stacked_equals_vmap_for_every_kind(name, kind):
    model = tiny_model()
    proximal = 0.5 if name == "implicit" else 0.0
    loop = mo.InnerLoop(model, mo.optim.momentum(lr=0.05, momentum=0.5), mo.losses.mse, proximal=proximal)
    meta = META_KINDS[kind](model)
    tasks = tiny_tasks(3, T)
    if name == "first_order" and "init" not in meta:
        meta = mo.meta_params(mo.Init(model), *meta.values())  # some kinds get zero first-order gradients alone
    if name == "truncated" and set(meta) == {"init"}:
        meta = META_KINDS["init+lrs_element"](model)  # an init acts before the cut alone: zero gradient
    stacked = STACKING[name]()(loop, meta, tasks, batching="stacked")
    assert stacked.stats["batching"] == "stacked"
    vmapped = STACKING[name]()(loop, meta, tasks, batching="vmap")
    _assert_same(stacked, vmapped)
    for key in ("residual", "stationarity"):  # implicit's per-task solves and stationarity, summarized alike
        if key in vmapped.stats:
            assert stacked.stats[key] == pytest.approx(vmapped.stats[key], rel=1e-10)


@pytest.mark.parametrize("kind", ["init", "lrs_scalar", "init+lrs_element", "weight_decay", "learned_optimizer_mlp",
                                  "synthetic_data"])
@pytest.mark.parametrize("estimator", [
    lambda: mo.EvolutionStrategies(population=6, particles_per_pass=6),
    lambda: mo.EvolutionStrategies(population=6, particles_per_pass=4),  # a pass of 2 pairs, then one of 1
    lambda: mo.PersistentES(population=4, k=1, particles_per_pass=2),
    lambda: mo.PersistentES(population=4, k=2, particles_per_pass=4)])  # windows of 2 steps and 1
def test_stacked_es_runs_its_particles_as_rows_and_equals_vmap(kind, estimator):
    """Several particles per pass stacked: one unroll of particles x tasks rows, each row at its own perturbed
    meta-values (the tasks' data repeated per particle, their own initializations too), across PES windows (T=3,
    k=1: three windows, the state carried between them). Equal to vmap over the tasks of the particles vmapped."""
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.momentum(lr=0.05, momentum=0.5), mo.losses.mse)
    meta = META_KINDS[kind](model)
    tasks = tiny_tasks(3, 3)
    if "init" not in meta:
        g = torch.Generator().manual_seed(2)
        tasks = tasks._replace(init={k: torch.randn(3, *p.shape, generator=g) for k, p in model.named_parameters()})
    stacked = estimator()(loop, meta, tasks, batching="stacked")
    assert stacked.stats["batching"] == "stacked"
    _assert_same(stacked, estimator()(loop, meta, tasks, batching="vmap"), rtol=1e-9)


def test_rows_at_their_own_rates_step_each_row_at_its_rate():
    """A stacked loop whose rows carry their own learned rates: one scalar rate per row ([B]) must scale that row's
    parameters, not broadcast against a parameter's last axis (here of size B too, where a [B] rate would run
    silently wrong)."""
    model = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1))  # a [3, 1] and a [1, 3] weight; B = 3
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta = META_KINDS["lrs_scalar"](model)
    tasks = tiny_tasks(3, 1)
    rates = torch.tensor([0.1, 0.2, 0.3])
    assert set(meta_values(meta)) == {"optimizer.lr"}
    rows = StackedLoop(loop, 3, row_meta={"optimizer.lr": rates})
    after = mo.unroll(rows, rows.init(meta), tasks.support, meta, create_graph=False)
    start = {k: p.detach() for k, p in model.named_parameters()}
    for b, task in enumerate(mo.unstack_tasks(tasks)):
        grads = torch.func.grad(lambda p: loop.inner_objective(p, loop.init(meta), task.support[0], meta)[0])(start)
        for k, p in start.items():
            torch.testing.assert_close(after.params[k][b], p - rates[b] * grads[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_stacked_equals_task_by_task_for_every_optimizer_with_learned_lrs(optimizer):
    """Elementwise optimizers step all tasks at once (Adam's 0-d step shared); per-element learned lrs
    broadcast against the task axis."""
    model = tiny_model()
    loop = mo.InnerLoop(model, OPTIMIZERS[optimizer](), mo.losses.mse)
    assert loop.optimizer.elementwise
    meta = META_KINDS["init+lrs_element"](model)
    tasks = tiny_tasks(4, 3)
    _assert_same(mo.Full()(loop, meta, tasks, batching="stacked"), mo.Full()(loop, meta, tasks, batching="loop"))


def test_a_stacked_step_from_a_detached_state_builds_a_graph_only_where_the_meta_parameters_act():
    """After truncated's cut the state is detached: the inner gradients' graph, taken through the fresh leaves the
    step makes, reaches no meta-parameter unless the inner objective reads one (a learned loss). Built anyway it was
    1.1 MB of unused graph on the sinusoid (truncated, init only)."""
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    tasks = tiny_tasks(3, T)
    for kind, in_graph in (("init", False), ("lrs_tensor", True), ("learned_loss", True), ("synthetic_data", True)):
        meta = META_KINDS[kind](model)
        stacked = StackedLoop(loop, 3)
        state = mo.detach_state(stacked.init(meta))
        after = stacked.step(state, tasks.support[0], meta)
        assert all(p.requires_grad == in_graph for p in after.params.values()), kind


def test_stacked_serves_a_proximal_term_and_tasks_with_their_own_init():
    model = tiny_model()
    proximal = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse, proximal=0.5)
    meta, tasks = META_KINDS["init"](model), tiny_tasks(3, T)
    _assert_same(mo.Full()(proximal, meta, tasks, batching="stacked"), mo.Full()(proximal, meta, tasks, batching="loop"))

    loop = mo.InnerLoop(model, mo.optim.adam(lr=0.05), mo.losses.mse)
    g = torch.Generator().manual_seed(2)
    own = tasks._replace(init={k: torch.randn(3, *p.shape, generator=g) for k, p in model.named_parameters()})
    meta = META_KINDS["lrs_tensor"](model)
    _assert_same(mo.Full()(loop, meta, own, batching="stacked"), mo.Full()(loop, meta, own, batching="loop"))


def _conv_problem(norm: str, track: bool, eval_mode: bool):
    torch.manual_seed(0)
    model = mo.Conv4(1, 3, channels=4, image_size=16, norm=norm, track_running_stats=track)
    model.train(not eval_mode)
    if track:
        for m in model.modules():
            if hasattr(m, "running_var"):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.3), mo.losses.cross_entropy)
    tasks = mo.RandomPatterns(n_way=3, k_shot=2, k_query=2, size=16).sample(3, T, torch.Generator().manual_seed(1))
    return loop, mo.meta_params(mo.Init(model)), tasks


@pytest.mark.parametrize("norm,track,eval_mode", [("primitive", False, False), ("fused", False, False),
                                                  ("fused", True, False), ("primitive", True, True)])
def test_stacked_conv4_second_order_equals_task_by_task(norm, track, eval_mode):
    """Grouped convolutions, max-pools and per-task BatchNorm statistics; the fused BatchNorm too, whose second
    derivatives vmap gets wrong (functorch #534) but ordinary autograd gets right: task by task is the
    reference, and auto now runs such a model stacked instead of one task at a time."""
    loop, meta, tasks = _conv_problem(norm, track, eval_mode)
    assert not unstacked_modules(loop.model)
    stacked = mo.Full()(loop, meta, tasks, batching="stacked")
    _assert_same(stacked, mo.Full()(loop, meta, tasks, batching="loop"), rtol=1e-9)
    assert mo.Full()(loop, meta, tasks).stats["batching"] == "stacked"


def test_stacked_batch_norm_updates_each_tasks_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())
    x = torch.randn(3, 4, 1, 5, 5)
    params = {k: v.expand(3, *v.shape) for k, v in model.named_parameters()}
    buffers = {k: v.expand(3, *v.shape) for k, v in model.named_buffers()}
    y, new = stacked_forward(model, params, buffers, x)
    for b in range(3):
        one = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())
        one.load_state_dict(model.state_dict())
        torch.testing.assert_close(y[b], one(x[b]))
        for k, v in one.named_buffers():
            torch.testing.assert_close(new[k][b], v.to(new[k].dtype), msg=k)
    assert all(v.abs().sum() == 0 for k, v in model.named_buffers() if k.endswith("running_mean"))  # untouched


class _Scale(nn.Module):
    """A layer without a stacked rule: it runs under vmap inside the stacked forward."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([1.5, -0.5, 2.0, 1.0, 0.3, 0.7]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_a_module_without_a_rule_runs_under_vmap_inside_the_stacked_forward():
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), _Scale(), nn.Linear(6, 1))
    assert unstacked_modules(model) == ["2"]
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta, tasks = META_KINDS["init"](model), tiny_tasks(3, T)
    _assert_same(mo.Full()(loop, meta, tasks, batching="stacked"), mo.Full()(loop, meta, tasks, batching="vmap"))


def test_what_cannot_run_stacked_says_why_and_auto_runs_what_can():
    model = nn.Sequential(nn.Linear(1, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1))  # no rule; wrong under vmap
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta, tasks = META_KINDS["init"](model), tiny_tasks(3, T)
    with pytest.raises(ValueError, match=r"batching='stacked'.*1 would run under vmap.*#534"):
        mo.Full()(loop, meta, tasks, batching="stacked")
    assert mo.Full()(loop, meta, tasks).stats["batching"] == "loop"
    assert mo.FirstOrder()(loop, meta, tasks).stats["batching"] == "stacked"  # no second derivatives
    mlp = tiny_model()
    mlp_loop, mlp_meta = mo.InnerLoop(mlp, mo.optim.sgd(lr=0.1), mo.losses.mse), META_KINDS["init"](mlp)
    online = mo.get_estimator("online_pes", population=2)
    with pytest.raises(ValueError, match="estimator 'online_pes' does not run stacked"):
        online(mlp_loop, mlp_meta, tasks, batching="stacked")
    random = mo.ForwardMode(mode="random")
    with pytest.raises(ValueError, match=r"forward \(random\) draws its tangents per task"):
        random(mlp_loop, mlp_meta, tasks, batching="stacked")
    assert random(mlp_loop, mlp_meta, tasks).stats["batching"] == "vmap"
    for name in ("truncated", "checkpoint", "forward", "es", "pes"):  # and those that do stack under "auto"
        assert mo.get_estimator(name)(mlp_loop, mlp_meta, tasks).stats["batching"] == "stacked"


def test_per_task_losses_equal_the_loss_of_each_task():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    logits, labels = torch.randn(3, 5, 4, generator=g), torch.randint(0, 4, (3, 5), generator=g)

    def huber(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.huber_loss(p, t)

    for loss, (p, t) in [(mo.losses.mse, (pred, target)), (mo.losses.cross_entropy, (logits, labels)),
                         (huber, (pred, target))]:
        expected = torch.stack([loss(p[b], t[b]) for b in range(3)])
        torch.testing.assert_close(per_task(loss, p, t), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind,expected", [("init", "stacked"), ("learned_loss", "stacked"),
                                           ("learned_optimizer_lstm", "vmap"), ("synthetic_data", "vmap")])
def test_auto_stacks_unless_a_per_task_piece_would_run_under_vmap_at_every_step(kind, expected):
    """A data transform or a learned update rule runs under vmap at every stacked step (vmap's fixed cost per
    call): auto vmaps those, by `stacked_slower`; asked for, stacked serves them (above)."""
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    assert mo.Full()(loop, META_KINDS[kind](model), tiny_tasks(3, T)).stats["batching"] == expected
