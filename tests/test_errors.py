"""Bad input gets a clear error that says what and where, before expensive work."""
from __future__ import annotations

import pytest
import torch

import metaopt as mo
from problems import tiny_model, tiny_tasks


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(mo.UnknownEstimator, match=r"unknown estimator 'fulll'; available: .*first_order.*full"):
        mo.get_estimator("fulll")


def test_registry_builds_with_kwargs():
    assert isinstance(mo.get_estimator("full"), mo.Full)
    assert isinstance(mo.get_estimator("first_order"), mo.FirstOrder)


def test_k_shot_larger_than_points_available():
    with pytest.raises(ValueError, match=r"k_shot \+ k_query = 15 \+ 10 = 25 .* points_per_task = 20"):
        mo.Sinusoid(k_shot=15, k_query=10, points_per_task=20)


def test_finite_pool_support_and_query_do_not_overlap(generator):
    task = mo.Sinusoid(k_shot=4, k_query=4, points_per_task=8).sample(3, 1, generator)
    both = torch.cat([task.support[0].x, task.query.x], dim=1).squeeze(-1)
    assert all(len(set(row.tolist())) == 8 for row in both)


def _loop_and_meta():
    model = tiny_model()
    return mo.InnerLoop(model, mo.optim.sgd(), mo.losses.mse), mo.meta_params(mo.Init(model))


def test_tasks_of_different_shapes_refuse_vmap_and_loop_under_auto():
    loop, meta = _loop_and_meta()
    a = mo.unstack_tasks(tiny_tasks(2, 2, k_shot=5))
    b = mo.unstack_tasks(tiny_tasks(1, 2, k_shot=3))
    with pytest.raises(mo.TaskShapeMismatch, match=r"task 2 support\[0\]\.x has shape \(3, 1\), task 0 has \(5, 1\)"):
        mo.Full()(loop, meta, a + b, batching="vmap")
    auto = mo.Full()(loop, meta, a + b)
    assert auto.stats["batching"] == "loop"
    # The loop result is the mean of the per-task meta-gradients.
    each = [mo.Full()(loop, meta, [t]).grads for t in a + b]
    for k, g in auto.grads.items():
        torch.testing.assert_close(g, sum(e[k] for e in each) / 3)


def test_tasks_with_different_inner_steps_cannot_stack():
    a = mo.unstack_tasks(tiny_tasks(1, 2))[0]
    b = mo.unstack_tasks(tiny_tasks(1, 3))[0]
    with pytest.raises(mo.TaskShapeMismatch, match="task 1 has 3 inner steps, task 0 has 2"):
        mo.stack_tasks([a, b])


def test_support_and_query_inputs_must_match():
    loop, meta = _loop_and_meta()
    task = mo.unstack_tasks(tiny_tasks(1, 1))[0]
    bad = mo.Task(support=(mo.Batch(torch.randn(5, 2), torch.randn(5, 1)),), query=task.query)
    with pytest.raises(mo.TaskShapeMismatch, match=r"task 0: task inputs differ in shape: support\[0\]\.x"):
        mo.Full()(loop, meta, [bad])


def test_inputs_and_targets_must_have_the_same_count():
    loop, meta = _loop_and_meta()
    task = mo.unstack_tasks(tiny_tasks(1, 1))[0]
    bad = mo.Task(support=(mo.Batch(torch.randn(5, 1), torch.randn(4, 1)),), query=task.query)
    with pytest.raises(mo.TaskShapeMismatch, match=r"support\[0\] has \(5,\) inputs but \(4,\) targets"):
        mo.Full()(loop, meta, [bad])


def test_unknown_batching_mode():
    loop, meta = _loop_and_meta()
    with pytest.raises(ValueError, match="batching must be 'auto', 'stacked', 'vmap' or 'loop', got 'fast'"):
        mo.Full()(loop, meta, tiny_tasks(2, 1), batching="fast")


def test_nothing_to_meta_learn():
    loop, _ = _loop_and_meta()
    with pytest.raises(ValueError, match="no parameters that require grad"):
        mo.Full()(loop, mo.meta_params(), tiny_tasks(2, 1))


def test_learning_rates_granularity_is_checked():
    with pytest.raises(ValueError, match="granularity must be 'scalar', 'tensor' or 'element', got 'row'"):
        mo.LearningRates(tiny_model(), granularity="row")


def test_mlp_activation_is_checked():
    with pytest.raises(ValueError, match="unknown activation 'sigmoid'"):
        mo.MLP(activation="sigmoid")


def test_evaluating_no_tasks_is_refused_before_any_work():
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    with pytest.raises(ValueError, match=r"evaluate: need n_tasks >= 1 .* got n_tasks=0"):
        mo.evaluate(loop, mo.meta_params(mo.Init(model)), mo.Sinusoid(k_shot=5), n_tasks=0)
