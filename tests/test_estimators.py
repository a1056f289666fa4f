"""Meta-gradients against independent references: finite differences, higher, TorchOpt, hand-written FOMAML."""
from __future__ import annotations

import pytest
import torch

import metaopt as mo
from problems import META_KINDS, OPTIMIZERS, central_difference, tiny_model, tiny_tasks

INNER_STEPS = 3


def _setup(kind: str, optimizer: str):
    model = tiny_model()
    loop = mo.InnerLoop(model, OPTIMIZERS[optimizer](), mo.losses.mse)
    meta = META_KINDS[kind](model)
    return model, loop, meta


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("kind", META_KINDS)
def test_full_equals_central_finite_differences(kind, optimizer, generator):
    _, loop, meta = _setup(kind, optimizer)
    tasks = tiny_tasks(3, INNER_STEPS)
    grads = mo.Full()(loop, meta, tasks).grads
    for _ in range(2):
        direction = {k: torch.randn(p.shape, generator=generator) for k, p in meta.named_parameters()}
        analytic = sum((grads[k] * d).sum() for k, d in direction.items()).item()
        numeric = central_difference(loop, meta, tasks, direction)
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_full_equals_gradcheck_on_learning_rate():
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(), mo.losses.mse)
    task = mo.unstack_tasks(tiny_tasks(1, INNER_STEPS))[0]

    no_meta = mo.meta_params()

    def outer(lr):
        state = loop.init(no_meta)
        for batch in task.support:
            state = loop.step(state, batch, no_meta, hyper={"lr": lr})
        return loop.outer_loss(state, task.query, no_meta)

    assert torch.autograd.gradcheck(outer, (torch.tensor(0.2, requires_grad=True),))


def _maml_init_gradient(optimizer: str):
    """A tiny model, 4 tasks, and metaopt's MAML meta-gradient of the model's initialization (`optimizer` inside)."""
    model = tiny_model()
    loop = mo.InnerLoop(model, OPTIMIZERS[optimizer](), mo.losses.mse)
    tasks = tiny_tasks(4, INNER_STEPS)
    return model, tasks, mo.Full()(loop, mo.meta_params(mo.Init(model)), tasks).grads


def _assert_init_gradient(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """metaopt's gradients ("init.params.a/b") equal a reference's by parameter name ("a.b")."""
    for name, ref in reference.items():
        torch.testing.assert_close(ours["init.params." + name.replace(".", "/")], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_full_equals_higher(optimizer):
    higher = pytest.importorskip("higher")
    model, tasks, ours = _maml_init_gradient(optimizer)
    torch_opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1),
                 "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)}[optimizer](model.parameters())
    total = 0.0
    for task in mo.unstack_tasks(tasks):
        with higher.innerloop_ctx(model, torch_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for batch in task.support:
                diffopt.step(mo.losses.mse(fmodel(batch.x), batch.y))
            total = total + mo.losses.mse(fmodel(task.query.x), task.query.y)
    reference = torch.autograd.grad(total / 4, list(model.parameters()))
    _assert_init_gradient(ours, {name: g for (name, _), g in zip(model.named_parameters(), reference)})


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_full_equals_torchopt(optimizer):
    """TorchOpt's MAML recipe (its few-shot example: a differentiable optimizer steps the module in place, task by
    task; the outer gradient accumulated by backward, the module's state recovered after each task), with inner
    SGD, momentum and Adam (moments differentiated; eps_root as metaopt's)."""
    torchopt = pytest.importorskip("torchopt")
    model, tasks, ours = _maml_init_gradient(optimizer)
    inner = {"sgd": lambda m: torchopt.MetaSGD(m, lr=0.1),
             "momentum": lambda m: torchopt.MetaSGD(m, lr=0.05, momentum=0.9),
             "adam": lambda m: torchopt.MetaAdam(m, lr=0.05, eps_root=1e-16)}[optimizer](model)
    leaves = dict(model.named_parameters())
    model_state, inner_state = torchopt.extract_state_dict(model), torchopt.extract_state_dict(inner)
    for task in mo.unstack_tasks(tasks):
        for batch in task.support:
            inner.step(mo.losses.mse(model(batch.x), batch.y))
        (mo.losses.mse(model(task.query.x), task.query.y) / 4).backward()
        torchopt.recover_state_dict(model, model_state)
        torchopt.recover_state_dict(inner, inner_state)
    _assert_init_gradient(ours, {name: leaf.grad for name, leaf in leaves.items()})


@pytest.mark.parametrize("estimator", [mo.Full(), mo.FirstOrder()], ids=str)
@pytest.mark.parametrize("kind", META_KINDS)
def test_vmap_equals_loop(estimator, kind):
    _, loop, meta = _setup(kind, "adam")
    tasks = tiny_tasks(5, INNER_STEPS)
    vmapped = estimator(loop, meta, tasks, batching="vmap")
    looped = estimator(loop, meta, tasks, batching="loop")
    assert vmapped.stats["batching"] == "vmap" and looped.stats["batching"] == "loop"
    torch.testing.assert_close(vmapped.outer_loss, looped.outer_loss, rtol=1e-12, atol=1e-12)
    for k in vmapped.grads:
        torch.testing.assert_close(vmapped.grads[k], looped.grads[k], rtol=1e-10, atol=1e-12)


def _hand_written_fomaml(model, lrs: dict[str, torch.Tensor], task):
    """FOMAML by hand: adapt with plain autograd, then the outer gradient at the adapted weights."""
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    inner_grads = []
    for batch in task.support:
        leaf = {k: v.requires_grad_() for k, v in params.items()}
        loss = mo.losses.mse(torch.func.functional_call(model, leaf, (batch.x,)), batch.y)
        g = dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values()))))
        inner_grads.append(g)
        params = {k: (v - lrs[k] * g[k]).detach() for k, v in leaf.items()}
    leaf = {k: v.requires_grad_() for k, v in params.items()}
    outer = mo.losses.mse(torch.func.functional_call(model, leaf, (task.query.x,)), task.query.y)
    d_adapted = dict(zip(leaf, torch.autograd.grad(outer, list(leaf.values()))))
    # init: d outer / d params_T; lr of tensor k: -sum_t <grad_t[k], d outer / d params_T[k]> (elementwise).
    d_lr = {k: -sum(g[k] * d_adapted[k] for g in inner_grads) for k in leaf}
    return d_adapted, d_lr


def test_first_order_equals_hand_written_fomaml():
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(), mo.losses.mse)
    meta = META_KINDS["init+lrs_element"](model)
    tasks = tiny_tasks(3, INNER_STEPS)
    ours = mo.FirstOrder()(loop, meta, tasks).grads
    lrs = {k.replace("/", "."): v.detach() for k, v in meta["optimizer"].lrs.items()}
    refs = [_hand_written_fomaml(model, lrs, t) for t in mo.unstack_tasks(tasks)]
    for name in lrs:
        key = name.replace(".", "/")
        init_ref = sum(r[0][name] for r in refs) / len(refs)
        lr_ref = sum(r[1][name] for r in refs) / len(refs)
        torch.testing.assert_close(ours[f"init.params.{key}"], init_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[f"optimizer.lrs.{key}"], lr_ref, rtol=1e-10, atol=1e-12)
    # Not degenerate: with 3 inner steps the second-order terms matter.
    full = mo.Full()(loop, meta, tasks).grads
    assert not torch.allclose(full["init.params.net/0/weight"], ours["init.params.net/0/weight"], rtol=1e-3)


def test_meta_grad_has_no_side_effects():
    _, loop, meta = _setup("init+lrs_element", "sgd")
    mo.Full()(loop, meta, tiny_tasks(2, 2))
    assert all(p.grad is None for p in meta.parameters())


def test_unused_meta_parameters_get_zero_gradient():
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model), mo.LearningRates(model))
    grads = mo.Full()(loop, meta, tiny_tasks(2, 0)).grads  # T = 0: the rates are never used
    assert all(torch.count_nonzero(g) == 0 for k, g in grads.items() if k.startswith("optimizer"))
    assert any(torch.count_nonzero(g) > 0 for k, g in grads.items() if k.startswith("init"))


STOCHASTIC = {"es": lambda seed: mo.EvolutionStrategies(population=4, seed=seed),
              "pes": lambda seed: mo.PersistentES(population=4, k=1, seed=seed),
              "online_pes": lambda seed: mo.estimators.OnlinePES(population=4, seed=seed),
              "forward_random": lambda seed: mo.ForwardMode(mode="random", seed=seed)}


def test_every_stochastic_estimator_is_tested_below():
    """A new estimator that declares `stochastic` must join STOCHASTIC (and so the stream test)."""
    declared = {cls.name for cls in mo.estimators.registered_estimators() if cls.stochastic}
    assert declared == {"es", "pes", "online_pes"} and declared <= set(STOCHASTIC)
    assert mo.ForwardMode(mode="random").stochastic and not mo.ForwardMode().stochastic


@pytest.mark.parametrize("name", STOCHASTIC)
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_stochastic_estimators_draw_from_their_own_seeded_stream(name, batching):
    """Same seed: the same estimate whatever the global RNG does (it is never advanced); another seed:
    another estimate; its state restores a stream mid-way."""
    _, loop, meta = _setup("init", "sgd")
    tasks = tiny_tasks(3, INNER_STEPS)
    global_state = torch.get_rng_state()
    first = STOCHASTIC[name](0)(loop, meta, tasks, batching=batching).grads
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(12345)
    again = STOCHASTIC[name](0)
    assert all(torch.equal(first[k], g) for k, g in again(loop, meta, tasks, batching=batching).grads.items())
    saved = again.rng_state()
    following = again(loop, meta, tasks, batching=batching).grads
    other = STOCHASTIC[name](1)
    assert any(not torch.equal(first[k], g) for k, g in other(loop, meta, tasks, batching=batching).grads.items())
    other.set_rng_state(saved)  # continues the seed-0 stream where it was saved
    assert all(torch.equal(following[k], g) for k, g in other(loop, meta, tasks, batching=batching).grads.items())


def test_forward_passes_of_one_hot_tangents_cover_every_scalar_once():
    """Exact forward mode with several tangents per pass: the passes' one-hot tangents, stacked, are the identity
    over all meta-parameter scalars (in order), whatever the pass boundaries."""
    from metaopt.estimators.forward import _one_hot_tangents
    values = {"a": torch.zeros(2, 3), "b": torch.zeros(()), "c": torch.zeros(4)}
    for per_pass in (1, 4, 5, 11):
        passes = [_one_hot_tangents(values, s, min(s + per_pass, 11)) for s in range(0, 11, per_pass)]
        rows = torch.cat([torch.cat([p[k].reshape(p[k].shape[0], -1) for k in values], dim=1) for p in passes])
        torch.testing.assert_close(rows, torch.eye(11))


@pytest.mark.parametrize("batching", ["stacked", "vmap", "loop"])
@pytest.mark.parametrize("kind", ["lrs_tensor", "synthetic_data"])
def test_forward_tangents_per_pass_equal_one_at_a_time_in_every_batching(kind, batching):
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta, tasks = META_KINDS[kind](model), tiny_tasks(3, 2)
    one = mo.ForwardMode(max_scalars=20)(loop, meta, tasks, batching=batching)
    passes = mo.ForwardMode(max_scalars=20, tangents_per_pass=4)(loop, meta, tasks, batching=batching)
    assert passes.stats["batching"] == batching
    torch.testing.assert_close(passes.outer_loss, one.outer_loss, rtol=1e-12, atol=0)
    for k, g in one.grads.items():
        torch.testing.assert_close(passes.grads[k], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batching", ["stacked", "vmap", "loop"])
@pytest.mark.parametrize("kind", ["init", "lrs_tensor", "learned_loss"])
@pytest.mark.parametrize("k", [None, 1])
def test_es_particles_per_pass_equal_one_at_a_time_in_every_batching(kind, batching, k):
    """Vmapped particles draw the same noise and give the same estimate as one unroll after another (ES: k None;
    PES over windows of one step: the noise of every window)."""
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta, tasks = META_KINDS[kind](model), tiny_tasks(3, 2)
    one = mo.PersistentES(population=6, k=k)(loop, meta, tasks, batching=batching)
    for per_pass in (2, 4, 6):  # 4: a last pass of one pair
        passes = mo.PersistentES(population=6, k=k, particles_per_pass=per_pass)(loop, meta, tasks, batching=batching)
        torch.testing.assert_close(passes.outer_loss, one.outer_loss, rtol=1e-12, atol=0)
        for name, g in one.grads.items():
            assert g.abs().max() > 0, name
            torch.testing.assert_close(passes.grads[name], g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", mo.available_estimators())
@pytest.mark.parametrize("compiled", [False, True])
def test_every_registered_method_describes_itself_by_its_arguments(name, compiled):
    """`describe` names a plan's estimator in reasons, metrics.json and the explorer's exclusions: it must work
    for every registered method (auto and compiled wrappers included) and show only constructor arguments."""
    from metaopt.prediction import describe
    if compiled and name == "auto":
        pytest.skip("auto is a planning policy: it does not compile (get_estimator refuses it, tested elsewhere)")
    method = mo.get_estimator(name, compile=compiled) if compiled else mo.get_estimator(name)
    text = describe(method)
    assert text.startswith(f"compiled({name}(" if compiled else f"{name}("), text
    assert "stochastic" not in text and "relative_time" not in text and "exact=" not in text
