"""One suite over the estimator table: each estimator keeps its promise against full backprop."""
from __future__ import annotations

import pytest
import torch

import metaopt as mo
from metaopt.stacked import StackedLoop
from db import ESTIMATORS
from problems import META_KINDS, assert_unbiased, tiny_model, tiny_tasks

T = 3


def _problem(kind: str, n_tasks: int = 2, inner_steps: int = T):
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.momentum(lr=0.05, momentum=0.5), mo.losses.mse)
    return loop, META_KINDS[kind](model), tiny_tasks(n_tasks, inner_steps)


@pytest.mark.parametrize("kind", sorted(META_KINDS))
@pytest.mark.parametrize("info", ESTIMATORS, ids=str)
def test_every_estimator_serves_or_refuses_every_kind(info, kind):
    loop, meta, tasks = _problem(kind)
    estimator = info.make(T)
    if kind not in info.kinds:
        with pytest.raises(mo.EstimatorUnsupported, match="use "):
            estimator(loop, meta, tasks)
        return
    result = estimator(loop, meta, tasks)
    names = {k for k, p in meta.named_parameters()}
    assert set(result.grads) == names
    assert all(torch.isfinite(g).all() and g.shape == dict(meta.named_parameters())[k].shape
               for k, g in result.grads.items())
    assert torch.isfinite(result.outer_loss) and result.stats["seconds"] >= 0


@pytest.mark.parametrize("kind", sorted(META_KINDS))
@pytest.mark.parametrize("info", [i for i in ESTIMATORS if i.promise == "exact"], ids=str)
def test_exact_estimators_equal_full(info, kind):
    if kind not in info.kinds:
        pytest.skip(f"{info} does not serve {kind}")
    loop, meta, tasks = _problem(kind, n_tasks=3)
    reference = mo.Full()(loop, meta, tasks)
    result = info.make(T)(loop, meta, tasks)
    torch.testing.assert_close(result.outer_loss, reference.outer_loss, rtol=1e-12, atol=0)
    for k, g in reference.grads.items():
        torch.testing.assert_close(result.grads[k], g, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("kind", ["lrs_tensor", "init"])
@pytest.mark.parametrize("info", [i for i in ESTIMATORS if i.promise == "unbiased"], ids=str)
def test_stochastic_estimators_are_unbiased(info, kind):
    """The mean of n independent estimates lies within 4 standard errors (computed from the samples) of full."""
    torch.manual_seed(7)
    loop, meta, tasks = _problem(kind, n_tasks=1)
    reference = mo.Full()(loop, meta, tasks).grads
    estimator = info.make(T)
    samples = [estimator(loop, meta, tasks, batching="loop").grads for _ in range(400)]
    assert_unbiased(samples, reference)


def test_truncated_es_is_biased_where_pes_is_not():
    """Truncated ES never perturbs the initialization when it acts before the last window: zero gradient."""
    torch.manual_seed(3)
    loop, meta, tasks = _problem("init", n_tasks=1)
    truncated = mo.estimators.PersistentES(population=8, sigma=1e-4, k=1, persistent=False)(loop, meta, tasks)
    assert all(torch.count_nonzero(g) == 0 for g in truncated.grads.values())
    pes = mo.estimators.PersistentES(population=8, sigma=1e-4, k=1)(loop, meta, tasks)
    assert any(torch.count_nonzero(g) > 0 for g in pes.grads.values())


def test_truncated_k1_differs_from_full_and_zeroes_the_init():
    loop, meta, tasks = _problem("init+lrs_element")
    result = mo.estimators.Truncated(k=1)(loop, meta, tasks).grads
    full = mo.Full()(loop, meta, tasks).grads
    assert all(torch.count_nonzero(g) == 0 for k, g in result.items() if k.startswith("init"))
    key = "optimizer.lrs.net/0/weight"
    assert not torch.allclose(result[key], full[key], rtol=1e-3)


def test_checkpoint_recomputes_each_step_once(monkeypatch):
    loop, meta, tasks = _problem("init", n_tasks=1, inner_steps=6)
    calls = []
    original = loop.step

    def counting_step(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    loop.step = counting_step  # instance attribute: only this loop object counts
    for segment in (1, 2, 4, 6):
        calls.clear()
        mo.estimators.Checkpoint(segment=segment)(loop, meta, tasks, batching="vmap")
        assert len(calls) == 2 * 6, segment  # forward sweep + each step recomputed exactly once
    stacked_step = StackedLoop.step

    def counting_stacked_step(*args, **kwargs):
        calls.append(1)
        return stacked_step(*args, **kwargs)

    monkeypatch.setattr(StackedLoop, "step", counting_stacked_step)  # stacked: the runner's StackedLoop steps
    calls.clear()
    mo.estimators.Checkpoint(segment=2)(loop, meta, tasks, batching="stacked")
    assert len(calls) == 2 * 6
    calls.clear()
    mo.Full()(loop, meta, tasks, batching="vmap")  # stacked runs a StackedLoop's steps, not this loop's
    assert len(calls) == 6


def test_reptile_moves_init_towards_adapted_params():
    loop, meta, tasks = _problem("init", n_tasks=1)
    grads = mo.estimators.Reptile()(loop, meta, tasks).grads
    task = mo.unstack_tasks(tasks)[0]
    with torch.no_grad():
        adapted = mo.unroll(loop, loop.init(meta), task.support, meta, create_graph=False).params
    for name, p in meta["init"].initial_params().items():
        torch.testing.assert_close(grads["init.params." + name.replace(".", "/")], p.detach() - adapted[name])


def test_forward_exact_refuses_many_meta_scalars():
    loop, meta, tasks = _problem("init")
    with pytest.raises(mo.EstimatorUnsupported, match=r"meta has 61 \(> max_scalars=20\); use forward with "
                                                     r"mode='random'"):
        mo.estimators.ForwardMode(max_scalars=20)(loop, meta, tasks)


@pytest.mark.parametrize("info", [i for i in ESTIMATORS if i.errors], ids=str)
def test_estimator_constructor_arguments_are_checked(info):
    for make, message in info.errors:
        with pytest.raises(ValueError, match=message):
            make()


def test_every_estimator_with_arguments_has_error_cases():
    """A registered estimator whose constructor checks its arguments has those checks in the table."""
    import inspect
    with_errors = {info.make(T).name for info in ESTIMATORS if info.errors}
    for cls in mo.estimators.registered_estimators():
        init = cls.__dict__.get("__init__")  # its own constructor, not an inherited one
        if init is not None and "raise ValueError" in inspect.getsource(init):
            assert cls.name in with_errors, f"{cls.name}: add its constructor errors to tests/db.py"


def test_the_table_covers_every_registered_estimator():
    """Adding an estimator to the registry without a row in tests/db.py fails here."""
    covered = {info.make(T).name for info in ESTIMATORS}
    assert covered == {cls.name for cls in mo.estimators.registered_estimators()}


@pytest.mark.parametrize("info", ESTIMATORS, ids=str)
def test_declarations_match_the_promise(info):
    """What an estimator declares to the planner agrees with what the suite checks it does."""
    estimator = info.make(T)
    if info.promise == "exact":
        assert estimator.bias(T) == 0.0 and estimator.relative_time >= 1.0
    else:
        assert estimator.bias(T) > 0  # implicit: exact only at a stationary point, so ranked after exact ones


def test_auto_ranks_every_declared_candidate_exact_first():
    from metaopt.planning import Predictor, ranked_candidates
    loop, meta, tasks = _problem("init+lrs_element", inner_steps=64)
    predictor = Predictor(loop, meta, tasks, meter=lambda e, t, b: 1000)
    ranked = ranked_candidates(mo.Auto(), loop, meta, 64, predictor)
    biases = [c.bias(64) for c in ranked]
    assert biases == sorted(biases) and ranked[0].name == "full" and ranked[-1].name == "first_order"
    assert {c.name for c in ranked} >= {"full", "checkpoint", "truncated", "first_order"}
