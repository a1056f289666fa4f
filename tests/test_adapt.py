"""Inner loops that adapt a subset of the parameters (`InnerLoop(adapt=...)`: ANIL, BOIL), against hand-written
references with plain autograd, finite differences, and the other batchings and estimators."""
from __future__ import annotations

import pytest
import torch

import metaopt as mo
from metaopt.loop import adapted_names
from problems import central_difference, tiny_model, tiny_tasks

INNER_STEPS = 3
HEAD = "net.4"  # tiny_model's last Linear


def _hand_written_anil(model: torch.nn.Module, tasks, adapted: set[str], lr: float, create_graph: bool = True):
    """The mean outer loss over tasks with only `adapted` parameters trained by plain SGD (autograd.grad of the
    inner loss with respect to them; the others used as they are), and its gradient with respect to every
    parameter of `model` (the initialization)."""
    init = dict(model.named_parameters())
    total = 0.0
    for task in mo.unstack_tasks(tasks):
        params = dict(init)
        for batch in task.support:
            loss = mo.losses.mse(torch.func.functional_call(model, params, (batch.x,)), batch.y)
            names = [k for k in params if k in adapted]
            grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)
            params = {**params, **{k: params[k] - lr * g for k, g in zip(names, grads)}}
        total = total + mo.losses.mse(torch.func.functional_call(model, params, (task.query.x,)), task.query.y)
    mean = total / len(mo.unstack_tasks(tasks))
    return mean, dict(zip(init, torch.autograd.grad(mean, list(init.values()))))


def _anil(adapt=(HEAD,), optimizer=None):
    model = tiny_model()
    loop = mo.InnerLoop(model, optimizer or mo.optim.sgd(lr=0.1), mo.losses.mse, adapt=list(adapt))
    return model, loop, mo.meta_params(mo.Init(model))


def _by_param_name(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("init.params.").replace("/", "."): g for k, g in grads.items()}


@pytest.mark.parametrize("batching", ["stacked", "vmap", "loop"])
@pytest.mark.parametrize("adapt", [(HEAD,), ("net.0", "net.2")], ids=["anil", "boil"])
def test_full_equals_hand_written_reference(adapt, batching):
    model, loop, meta = _anil(adapt)
    tasks = tiny_tasks(4, INNER_STEPS)
    result = mo.Full()(loop, meta, tasks, batching=batching)
    loss, reference = _hand_written_anil(model, tasks, set(adapted_names(dict(model.named_parameters()), adapt)),
                                         lr=0.1)
    assert result.stats["batching"] == batching
    torch.testing.assert_close(result.outer_loss, loss.detach(), rtol=1e-12, atol=1e-12)
    ours = _by_param_name(result.grads)
    for name, ref in reference.items():
        assert ref.abs().sum() > 0, name  # every parameter, held or adapted, gets an outer gradient
        torch.testing.assert_close(ours[name], ref, rtol=1e-9, atol=1e-12)


def test_first_order_equals_hand_written_first_order_anil():
    model, loop, meta = _anil()
    tasks = tiny_tasks(4, INNER_STEPS)
    _, reference = _hand_written_anil(model, tasks, {HEAD + ".weight", HEAD + ".bias"}, lr=0.1, create_graph=False)
    ours = _by_param_name(mo.FirstOrder()(loop, meta, tasks).grads)
    for name, ref in reference.items():
        torch.testing.assert_close(ours[name], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("estimator", [mo.Checkpoint(segment=2), mo.Truncated(k=INNER_STEPS),
                                       mo.ForwardMode(mode="exact")], ids=str)
def test_exact_estimators_agree_with_full(estimator):
    _, loop, meta = _anil(optimizer=mo.optim.adam(lr=0.05))
    tasks = tiny_tasks(3, INNER_STEPS)
    full = mo.Full()(loop, meta, tasks)
    other = estimator(loop, meta, tasks)
    for k in full.grads:
        torch.testing.assert_close(other.grads[k], full.grads[k], rtol=1e-8, atol=1e-11)


def test_learned_rates_of_the_adapted_parameters_match_finite_differences(generator):
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.momentum(lr=0.05, momentum=0.9), mo.losses.mse, adapt=[HEAD])
    rates = mo.LearningRates(model, init=(0.05, 0.15), granularity="element", adapt=[HEAD])
    meta = mo.meta_params(mo.Init(model), rates)
    assert {name for name, _ in rates.named_parameters()} == {"lrs.net/4/weight", "lrs.net/4/bias"}  # the head's
    tasks = tiny_tasks(3, INNER_STEPS)
    for batching in ("stacked", "vmap"):
        grads = mo.Full()(loop, meta, tasks, batching=batching).grads
        for _ in range(2):
            direction = {k: torch.randn(p.shape, generator=generator) for k, p in meta.named_parameters()}
            analytic = sum((grads[k] * d).sum() for k, d in direction.items()).item()
            assert analytic == pytest.approx(central_difference(loop, meta, tasks, direction), rel=1e-6, abs=1e-9)


def test_held_parameters_stay_at_their_initial_values_and_keep_no_optimizer_state():
    model, loop, meta = _anil(optimizer=mo.optim.adam(lr=0.05))
    task = mo.unstack_tasks(tiny_tasks(1, INNER_STEPS))[0]
    start = loop.init(meta)
    assert set(start.opt_state[1].mu) == {HEAD + ".weight", HEAD + ".bias"}  # (weight decay, adam): adam's moments
    end = mo.unroll(loop, start, task.support, meta)
    assert list(end.params) == list(start.params)  # the same order
    for name, value in end.params.items():
        moved = not torch.equal(value, start.params[name])
        assert moved == name.startswith(HEAD), name


def test_adapting_every_parameter_is_maml():
    model = tiny_model()
    everything = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse, adapt=["net"])
    plain = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta, tasks = mo.meta_params(mo.Init(model)), tiny_tasks(3, INNER_STEPS)
    ours, maml = mo.Full()(everything, meta, tasks).grads, mo.Full()(plain, meta, tasks).grads
    for k in maml:
        torch.testing.assert_close(ours[k], maml[k], rtol=1e-12, atol=1e-14)


def test_conv4_anil_stacked_equals_vmap_and_the_loop():
    """BatchNorm buffers and a conv body held: the three batchings give the same meta-gradient."""
    model = mo.Conv4(1, 3, channels=4, image_size=8, pools=2)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.4), mo.losses.cross_entropy, adapt=["head"])
    meta = mo.meta_params(mo.Init(model))
    g = torch.Generator().manual_seed(0)
    x, xq = torch.randn(3, 3, 1, 8, 8, generator=g), torch.randn(3, 6, 1, 8, 8, generator=g)
    y, yq = torch.arange(3).repeat(3, 1), torch.arange(3).repeat(3, 2)
    tasks = mo.Task(support=[mo.Batch(x, y)] * 2, query=mo.Batch(xq, yq))
    results = {b: mo.Full()(loop, meta, tasks, batching=b) for b in ("stacked", "vmap", "loop")}
    for b in ("vmap", "loop"):
        for k in results["stacked"].grads:
            torch.testing.assert_close(results[b].grads[k], results["stacked"].grads[k], rtol=1e-9, atol=1e-12)


def test_protomaml_adapts_only_its_prototype_head():
    model = mo.Conv4(1, 0, channels=4, image_size=8, pools=2)
    loop = mo.ProtoMAMLLoop(model, mo.optim.sgd(lr=0.4), n_way=3, adapt=["head"])
    meta = mo.meta_params(mo.Init(model))
    g = torch.Generator().manual_seed(1)
    batch = mo.Batch(torch.randn(3, 1, 8, 8, generator=g), torch.arange(3))
    start = loop.init(meta)
    end = mo.unroll(loop, start, [batch, batch], meta)
    for name, value in start.params.items():
        assert torch.equal(end.params[name], value), name
    one_step = mo.unroll(loop, start, [batch], meta)
    assert not torch.equal(end.params["head.weight"], one_step.params["head.weight"])  # the head does adapt


def test_bad_adapt_is_refused_naming_the_parameters():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\['nett'\] name no parameter of MLP; its parameters are \['net.0.weight'"):
        mo.InnerLoop(model, mo.optim.sgd(), mo.losses.mse, adapt=["net.4", "nett"])
    with pytest.raises(ValueError, match="would train no parameter"):
        mo.InnerLoop(model, mo.optim.sgd(), mo.losses.mse, adapt=[])
    with pytest.raises(ValueError, match="names no parameter"):
        mo.LearningRates(model, adapt=["head"])
    # a module path is matched whole: "net.0" is not a prefix of "net.01"
    assert adapted_names(["net.0.weight", "net.01.weight", "net.0"], ["net.0"]) == ["net.0.weight", "net.0"]


@pytest.mark.parametrize("estimator", [mo.Implicit(), mo.Reptile()], ids=str)
def test_estimators_that_cannot_hold_parameters_refuse(estimator):
    _, loop, meta = _anil()
    with pytest.raises(mo.EstimatorUnsupported, match="adapt"):
        estimator(loop, meta, tiny_tasks(2, INNER_STEPS))


def _compose(overrides: list[str]):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="train", overrides=["debug=tiny", *overrides])


@pytest.mark.parametrize("value", ["[net.4]", "net.4"])
def test_the_config_key_reaches_the_loop_and_the_learned_rates(value):
    from metaopt_hydra.build import build

    parts = build(_compose([f"adapt={value}", "metaparam=lrs"]))
    assert parts.loop.adapt == ("net.4",)
    assert {name for name, _ in parts.meta["optimizer"].named_parameters()} == {"lrs.net/4/weight", "lrs.net/4/bias"}


def test_a_loop_without_inner_gradient_steps_refuses_adapt():
    from metaopt_hydra.build import build

    cfg = _compose(["adapt=[head]", "loop=protonet", "model=conv4", "model.out_features=0", "model.image_size=16",
                    "model.channels=4", "task=patterns", "task.size=16"])
    with pytest.raises(ValueError, match="loop=PrototypeLoop takes no inner gradient steps"):
        build(cfg)


@pytest.mark.parametrize("batching", ["auto", "stacked"])
def test_compiled_anil_equals_eager(batching):
    """The compiled path traces the narrowed inner step (vmapped where `auto`, on the task axis where stacked)."""
    _, loop, meta = _anil(optimizer=mo.optim.momentum(lr=0.05, momentum=0.5))
    tasks = tiny_tasks(3, 2)
    compiled = mo.get_estimator("full", compile=True)
    result = compiled(loop, meta, tasks, batching=batching)
    assert compiled.fallback_reason is None and compiled.compiled_calls == 1
    eager = mo.Full()(loop, meta, tasks, batching="vmap")
    torch.testing.assert_close(result.outer_loss, eager.outer_loss, rtol=1e-10, atol=0)
    for k, g in eager.grads.items():
        torch.testing.assert_close(result.grads[k], g, rtol=1e-10, atol=1e-12, msg=f"gradient of {k}")


@pytest.mark.parametrize("estimator", [lambda: mo.EvolutionStrategies(population=4, particles_per_pass=4),
                                       lambda: mo.PersistentES(population=4, k=1, particles_per_pass=2)])
def test_stacked_evolution_strategies_with_the_heads_rates_equal_vmap(estimator):
    """Rows at their own meta-values (`row_meta`): each row's learned rates, the head's only, step its head."""
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.momentum(lr=0.05, momentum=0.5), mo.losses.mse, adapt=[HEAD])
    meta = mo.meta_params(mo.Init(model), mo.LearningRates(model, init=(0.05, 0.15), granularity="element",
                                                           adapt=[HEAD]))
    tasks = tiny_tasks(3, 3)
    stacked = estimator()(loop, meta, tasks, batching="stacked")
    vmapped = estimator()(loop, meta, tasks, batching="vmap")
    assert stacked.stats["batching"] == "stacked"
    torch.testing.assert_close(stacked.outer_loss, vmapped.outer_loss, rtol=1e-9, atol=1e-12)
    for k, g in vmapped.grads.items():
        assert g.abs().sum() > 0, k
        torch.testing.assert_close(stacked.grads[k], g, rtol=1e-9, atol=1e-12)
