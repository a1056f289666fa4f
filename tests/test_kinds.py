"""The meta-parameter kinds beyond init and learning rates, and the tasks they train on.

Their meta-gradients are checked against finite differences and full backprop by the
table-driven suites (problems.META_KINDS x db.ESTIMATORS); here: what each kind promises
on its own, and the kinds that need image or classification problems.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import metaopt as mo
from db import ESTIMATORS
from metaopt.metaparams.learned_optimizer import preprocess_log_sign
from problems import central_difference, tiny_model, tiny_tasks

T = 3


# --- tasks ------------------------------------------------------------------------------------------

def test_digits_tasks_are_balanced_reproducible_and_permuted_per_task():
    tasks = mo.Digits(k_shot=2, k_query=3, query_split="test", permute_pixels=True)
    a = tasks.sample(4, 2, torch.Generator().manual_seed(0))
    b = tasks.sample(4, 2, torch.Generator().manual_seed(0))
    assert a.support[0].x.shape == (4, 20, 64) and a.query.x.shape == (4, 30, 64)
    assert torch.equal(a.support[0].y[0], torch.arange(10).repeat_interleave(2))
    torch.testing.assert_close(a.query.x, b.query.x)
    assert a.support[0] is a.support[1]  # one batch reused (few-shot)
    # each task permutes its pixels its own way: the sampler draws the permutations first, then the images
    g = torch.Generator().manual_seed(0)
    perms = [torch.randperm(64, generator=g) for _ in range(4)]
    plain = mo.Digits(k_shot=2, k_query=3, query_split="test").sample(4, 2, g)
    for i, perm in enumerate(perms):
        torch.testing.assert_close(a.query.x[i], plain.query.x[i][:, perm])
        torch.testing.assert_close(a.support[0].x[i], plain.support[0].x[i][:, perm])
    assert not torch.equal(perms[0], perms[1])


def test_digits_resamples_support_per_step_and_refuses_impossible_k():
    tasks = mo.Digits(k_shot=1, k_query=2, resample_support=True, flat=False)
    task = tasks.sample(2, 3, torch.Generator().manual_seed(1))
    assert len({id(b) for b in task.support}) == 3 and task.support[0].x.shape == (2, 10, 1, 8, 8)
    with pytest.raises(ValueError, match=r"1000 images per class requested from the train split"):
        mo.Digits(k_shot=1000)
    with pytest.raises(ValueError, match="split must be"):
        mo.tasks.digits.load_digits_split("valid")


def test_random_init_is_reproducible_differs_per_task_and_never_touches_the_model():
    model = mo.MLP(64, (8,), 10)
    before = {k: p.clone() for k, p in model.state_dict().items()}
    tasks = mo.RandomInit(mo.Digits(k_shot=1, k_query=2), model)
    a = tasks.sample(3, 1, torch.Generator().manual_seed(5))
    b = tasks.sample(3, 1, torch.Generator().manual_seed(5))
    assert set(a.init) == {k for k, _ in model.named_parameters()}
    for k in a.init:
        torch.testing.assert_close(a.init[k], b.init[k])
        assert not torch.equal(a.init[k][0], a.init[k][1])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert tasks.kind == "classification"


def test_task_init_is_where_each_task_starts_and_conflicts_with_a_learned_init():
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(0.1), mo.losses.mse)
    start = {k: torch.full_like(p, 0.5) for k, p in model.named_parameters()}
    assert all(torch.equal(loop.init(mo.meta_params(), start).params[k], v) for k, v in start.items())
    with pytest.raises(ValueError, match="Task.init.*slot 'init'"):
        loop.init(mo.meta_params(mo.Init(model)), start)


@pytest.mark.parametrize("estimator", [mo.Checkpoint(segment=1), mo.Truncated(k=T)], ids=str)
def test_exact_estimators_equal_full_with_per_task_inits(estimator):
    """The init is task data: vmapped and recomputed (checkpointing) from the same values."""
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.momentum(0.05, 0.5), mo.losses.mse)
    meta = mo.meta_params(mo.LearningRates(model, init=0.1, granularity="tensor"))
    tasks = mo.RandomInit(mo.Sinusoid(k_shot=5, k_query=7), model).sample(3, T, torch.Generator().manual_seed(2))
    reference = mo.Full()(loop, meta, tasks, batching="loop")
    for batching in ("vmap", "loop"):
        result = estimator(loop, meta, tasks, batching=batching)
        for k, g in reference.grads.items():
            torch.testing.assert_close(result.grads[k], g, rtol=1e-6, atol=1e-10)


# --- learned optimizer ------------------------------------------------------------------------------

def test_log_sign_preprocessing():
    x = torch.tensor([2.0, -1e-3, 0.0, 1e-6])
    out = preprocess_log_sign(x, p=10.0)
    torch.testing.assert_close(out[0], torch.tensor([math.log(2.0) / 10, 1.0]))
    torch.testing.assert_close(out[1], torch.tensor([math.log(1e-3) / 10, -1.0]))
    torch.testing.assert_close(out[2], torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(out[3], torch.tensor([-1.0, math.exp(10) * 1e-6]))


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("architecture", ["lstm", "mlp"])
def test_learned_optimizer_starts_as_its_base_and_keeps_per_coordinate_state(architecture, base):
    model = tiny_model()
    rule = mo.LearnedOptimizer(model, architecture, hidden=4, base=base, base_lr=0.07)
    meta = mo.meta_params(rule)
    loop = mo.InnerLoop(model, mo.optim.momentum(), mo.losses.mse)  # ignored: the rule owns the update
    sgd = mo.InnerLoop(model, mo.optim.sgd(0.07) if base == "sgd" else mo.optim.adam(0.07), mo.losses.mse)
    task = mo.unstack_tasks(tiny_tasks(1, 3))[0]
    mine = mo.unroll(loop, loop.init(meta), task.support, meta)
    theirs = mo.unroll(sgd, sgd.init(mo.meta_params()), task.support, mo.meta_params())
    for k, p in theirs.params.items():
        torch.testing.assert_close(mine.params[k], p)
    if architecture == "lstm":
        assert all(mine.opt_state.h[k].shape == (*p.shape, 4) for k, p in mine.params.items())
    # coordinate-wise: the rule's size does not depend on the model's
    assert sum(p.numel() for p in rule.parameters()) == \
        sum(p.numel() for p in mo.LearnedOptimizer(mo.MLP(1, (50, 50), 1), architecture, hidden=4).parameters())


def test_learned_optimizer_arguments_are_checked():
    with pytest.raises(ValueError, match="architecture"):
        mo.LearnedOptimizer(tiny_model(), "gru")
    with pytest.raises(ValueError, match="decays"):
        mo.LearnedOptimizer(tiny_model(), decays=(1.0,))
    with pytest.raises(ValueError, match="base must be"):
        mo.LearnedOptimizer(tiny_model(), base="rmsprop")


# --- learned loss -----------------------------------------------------------------------------------

def test_learned_loss_in_add_mode_starts_as_the_task_loss():
    model = tiny_model()
    meta = mo.meta_params(mo.LearnedLoss(model, pred_features=1, input_features=1))
    loop = mo.InnerLoop(model, mo.optim.sgd(0.1), mo.losses.mse)
    task = mo.unstack_tasks(tiny_tasks(1, 2))[0]
    mine = mo.unroll(loop, loop.init(meta), task.support, meta)
    plain = mo.unroll(loop, loop.init(mo.meta_params()), task.support, mo.meta_params())
    for k, p in plain.params.items():
        torch.testing.assert_close(mine.params[k], p)


def test_learned_loss_classification_features_and_errors():
    model = mo.MLP(4, (5,), 3)
    loss = mo.LearnedLoss(model, pred_features=3, target="classification", mode="replace")
    batch = mo.Batch(torch.randn(6, 4), torch.tensor([0, 1, 2, 2, 1, 0]))
    pred = model(batch.x)
    feats = loss.features(pred, batch)
    assert feats.shape == (6, 6)
    torch.testing.assert_close(feats[:, 3:], nn.functional.one_hot(batch.y, 3).to(feats.dtype))
    assert loss.inner_loss(pred, batch, {}, mo.losses.cross_entropy) > 0  # softplus: positive
    with pytest.raises(ValueError, match="features per example"):
        mo.LearnedLoss(model, pred_features=2, target="classification").features(pred, batch)
    with pytest.raises(ValueError, match="mode"):
        mo.LearnedLoss(model, pred_features=3, mode="sum")


# --- data slot: synthetic data and augmentation, on a tiny image classification problem ---------------

def _image_problem(kind: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3))
    loop = mo.InnerLoop(model, mo.optim.sgd(0.3), mo.losses.cross_entropy)
    if kind == "augmentation":
        meta = mo.meta_params(mo.Init(model), mo.LearnedAffineAugmentation(model, copies=2, init_std=0.1))
    else:
        meta = mo.meta_params(mo.SyntheticData(model, shape=(1, 4, 4), n_classes=3, n_per_class=2,
                                               learn_labels=True))
    tasks = mo.RandomPatterns(n_way=3, k_shot=2, k_query=3, size=4).sample(2, T, torch.Generator().manual_seed(1))
    return loop, meta, tasks


@pytest.mark.parametrize("kind", ["augmentation", "synthetic_soft_labels"])
def test_data_kinds_match_finite_differences(kind):
    loop, meta, tasks = _image_problem(kind)
    grads = mo.Full()(loop, meta, tasks).grads
    g = torch.Generator().manual_seed(4)
    direction = {k: torch.randn(p.shape, generator=g) for k, p in meta.named_parameters()}
    analytic = sum((grads[k] * d).sum() for k, d in direction.items()).item()
    assert analytic == pytest.approx(central_difference(loop, meta, tasks, direction), rel=1e-6, abs=1e-9)


DATA_SERVED = {"full", "checkpoint", "checkpoint_S2", "truncated_k=T", "forward_random", "es", "pes", "pes_2_per_pass",
               "online_pes", "online_pes_2_per_pass", "truncated_k=1", "first_order", "truncated_es", "implicit"}


@pytest.mark.parametrize("kind", ["augmentation", "synthetic_soft_labels"])
@pytest.mark.parametrize("info", ESTIMATORS, ids=str)
def test_every_estimator_serves_or_refuses_the_data_kinds(info, kind):
    loop, meta, tasks = _image_problem(kind)
    estimator = info.make(T)
    served = info.id in DATA_SERVED and not (info.id == "implicit" and "init" in meta)
    if not served:
        with pytest.raises(mo.EstimatorUnsupported, match="use "):
            estimator(loop, meta, tasks)
        return
    result = estimator(loop, meta, tasks)
    assert set(result.grads) == {k for k, _ in meta.named_parameters()}
    assert all(torch.isfinite(g).all() for g in result.grads.values())
    if info.promise == "exact":
        reference = mo.Full()(loop, meta, tasks)
        for k, g in reference.grads.items():
            torch.testing.assert_close(result.grads[k], g, rtol=1e-6, atol=1e-10)


def test_identity_warps_copy_the_support_images():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    aug = mo.LearnedAffineAugmentation(model, copies=3, init_std=0.0)
    batch = mo.Batch(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    out = aug.transform(batch)
    assert out.x.shape == (16, 1, 8, 8) and torch.equal(out.y, batch.y.repeat(4))
    torch.testing.assert_close(out.x[4:8], batch.x, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"images \[n, C, H, W\]"):
        aug.transform(mo.Batch(torch.rand(4, 64), batch.y))


def test_fixed_warps_are_the_learned_warps_at_init_without_meta_parameters():
    """learn=False (the fixed-warps ablation): the same warps as the learned kind's start, as buffers; the
    meta-gradient then reaches only the initialization."""
    loop, learned_meta, tasks = _image_problem("augmentation")
    model = loop.model
    fixed = mo.LearnedAffineAugmentation(model, copies=2, init_std=0.1, learn=False)
    assert not list(fixed.parameters()) and set(fixed.state_dict()) == {"delta", "brightness"}
    batch = tasks.support[0]
    single = mo.Batch(batch.x[0], batch.y[0])
    torch.testing.assert_close(fixed.transform(single).x, learned_meta["data"].transform(single).x.detach())
    meta = mo.meta_params(mo.Init(model), fixed)
    grads = mo.Full()(loop, meta, tasks).grads
    assert set(grads) == {k for k, _ in meta.named_parameters()} and all(k.startswith("init.") for k in grads)
    assert all(torch.isfinite(g).all() for g in grads.values()) and "fixed" in repr(fixed)


def test_synthetic_data_replaces_the_support_set():
    model = mo.MLP(64, (8,), 10)
    data = mo.SyntheticData(model, shape=(64,), n_classes=10, n_per_class=2, learn_labels=True)
    out = data.transform(mo.Batch(torch.zeros(3, 64), torch.zeros(3, dtype=torch.long)))
    assert out.x.shape == (20, 64) and out.y.shape == (20, 10)
    torch.testing.assert_close(out.y.sum(-1), torch.ones(20))
    assert torch.equal(out.y.argmax(-1), torch.arange(10).repeat_interleave(2))
    with pytest.raises(ValueError, match="n_classes"):
        mo.SyntheticData(model, shape=(64,), n_classes=1)


def test_distilled_data_trains_fresh_models_better_than_noise_after_a_few_meta_steps():
    """Meta-training the synthetic set lowers the post-training loss of fresh random inits (held-out digits)."""
    torch.manual_seed(0)
    model = mo.MLP(64, (16,), 10)
    meta = mo.meta_params(mo.SyntheticData(model, shape=(64,), n_classes=10),
                          mo.LearningRates(model, init=0.3, granularity="scalar"))
    loop = mo.InnerLoop(model, mo.optim.sgd(), mo.losses.cross_entropy)
    train = mo.RandomInit(mo.Digits(k_shot=1, k_query=10), model)
    test = mo.RandomInit(mo.Digits(k_shot=1, k_query=10, query_split="test"), model)
    before = mo.evaluate(loop, meta, test, n_tasks=50, inner_steps=5)["meta_test_loss"]
    mo.meta_train(loop, meta, mo.Full(), train, outer_optimizer=torch.optim.Adam(meta.parameters(), lr=0.05),
                  meta_steps=30, meta_batch_size=4, inner_steps=5, eval_n_tasks=0, progress=False)
    after = mo.evaluate(loop, meta, test, n_tasks=50, inner_steps=5)["meta_test_loss"]
    assert after < 0.8 * before
