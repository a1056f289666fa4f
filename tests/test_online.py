"""Online training: OnlineTasks' windows and resets, online PES's carried particles, and resume."""
from __future__ import annotations

import pytest
import torch

import metaopt as mo
from metaopt.estimators import OnlinePES
from metaopt.online import OnlineTasks
from metaopt.types import Carry
from problems import META_KINDS, assert_unbiased, tiny_model, tiny_tasks


@pytest.mark.parametrize("kind", ["init", "lrs_tensor"])
def test_online_pes_window_estimates_are_unbiased_for_the_loss_through_the_whole_unroll(kind):
    """Three windows of one step, meta fixed: the mean of the third window's estimates (carried particles)
    is the full-backprop gradient of the loss after all three steps from the initialization, within 4
    standard errors. Truncated backprop over the window would give the init no gradient at all."""
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.momentum(lr=0.05, momentum=0.5), mo.losses.mse)
    meta = META_KINDS[kind](model)
    task = tiny_tasks(1, 3)
    reference = mo.Full()(loop, meta, task).grads
    estimator = OnlinePES(population=2, sigma=1e-4, seed=1)
    samples = []
    for _ in range(300):
        carry = None
        for j in range(3):
            window = task._replace(support=task.support[j:j + 1], carry=Carry(torch.tensor([j == 0]), carry))
            result = estimator(loop, meta, window)
            carry = result.carry
        samples.append(result.grads)
    assert_unbiased(samples, reference)


def test_online_pes_carries_each_particle_and_restarts_fresh_tasks():
    """The carry holds 2 x pairs inner states per task (task axis first, across vmapped chunks); a task
    marked fresh starts from the initialization again, the others continue from their carried state."""
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta = META_KINDS["init"](model)
    tasks = tiny_tasks(3, 2)
    estimator = OnlinePES(population=4, sigma=1e-3, seed=0)
    first = estimator(loop, meta, tasks._replace(carry=Carry(torch.ones(3, dtype=torch.bool), None)), chunk_size=2)
    weight = "net.0.weight"
    assert first.carry.plus.params[weight].shape == (3, 2, *model.state_dict()[weight].shape)
    assert first.carry.xi["init.params.net/0/weight"].shape[:2] == (3, 2)
    fresh = torch.tensor([True, False, False])
    second = estimator(loop, meta, tasks._replace(carry=Carry(fresh, first.carry)), batching="loop")
    xi_1 = first.carry.xi["init.params.net/0/weight"]
    xi_2 = second.carry.xi["init.params.net/0/weight"]
    # a continuing task's accumulated perturbation grows by one draw; a fresh task's is one draw
    assert torch.allclose((xi_2[1:] - xi_1[1:]).std(), torch.tensor(1.0, dtype=xi_1.dtype), atol=0.35)
    assert xi_2[0].std() < xi_2[1:].std()
    assert not torch.allclose(second.carry.plus.params[weight][1:], first.carry.plus.params[weight][1:])


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("kind", ["init", "lrs_tensor"])
def test_online_pes_particles_per_pass_equal_one_at_a_time_across_windows(kind, batching):
    """Particles vmapped in one pass draw the same noise and carry the same states as one after another: two
    windows (the second continues two of three tasks from the first's carry), every pass split (2: one pair per
    pass; 4: a last pass of one pair; 6: all)."""
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta, tasks = META_KINDS[kind](model), tiny_tasks(3, 2)

    def two_windows(per_pass: int) -> tuple[mo.MetaGrad, mo.MetaGrad]:
        estimator = OnlinePES(population=6, sigma=1e-2, particles_per_pass=per_pass)
        first = estimator(loop, meta, tasks._replace(carry=Carry(torch.ones(3, dtype=torch.bool), None)),
                          batching=batching)
        fresh = torch.tensor([True, False, False])
        return first, estimator(loop, meta, tasks._replace(carry=Carry(fresh, first.carry)), batching=batching)

    one = two_windows(1)
    for per_pass in (2, 4, 6):
        for window, reference in zip(two_windows(per_pass), one):
            torch.testing.assert_close(window.outer_loss, reference.outer_loss, rtol=1e-12, atol=0)
            for name, g in reference.grads.items():
                assert g.abs().max() > 0, name
                torch.testing.assert_close(window.grads[name], g, rtol=1e-9, atol=1e-12)
            for got, want in zip(torch.utils._pytree.tree_leaves(window.carry),
                                 torch.utils._pytree.tree_leaves(reference.carry)):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_online_tasks_stagger_windows_and_replace_finished_unrolls():
    base = mo.Sinusoid(k_shot=3, k_query=4)
    source = OnlineTasks(base, horizon=6)
    g = torch.Generator().manual_seed(0)
    batch, pool = source.next_batch(3, 2, g)
    assert pool.length == [6, 4, 2] and pool.position == [2, 2, 2]
    assert batch.carry.fresh.tolist() == [True, True, True] and batch.carry.state is None
    assert torch.equal(batch.support[1].x[2], pool.tasks[2].support[1].x)
    carry = {"x": torch.zeros(3)}
    batch, pool2 = source.next_batch(3, 2, g, pool, carry)
    assert batch.carry.fresh.tolist() == [False, False, True]  # task 2's short first unroll ended
    assert pool2.tasks[0] is pool.tasks[0] and pool2.tasks[2] is not pool.tasks[2]
    assert torch.equal(batch.support[0].x[0], pool.tasks[0].support[2].x)  # task 0's second window
    assert batch.carry.state is carry
    with pytest.raises(ValueError, match="must divide the horizon"):
        source.next_batch(3, 4, g)
    with pytest.raises(ValueError, match="meta-batch size cannot change"):
        source.next_batch(2, 2, g, pool2, carry)


def _online_run(tmp_path, meta_steps, estimator="online_pes"):
    torch.manual_seed(0)
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
    meta = META_KINDS["init+lrs_element"](model)
    return meta, mo.meta_train(
        loop, meta, mo.get_estimator(estimator, **({"population": 4, "sigma": 0.01} if estimator != "full" else {})),
        OnlineTasks(mo.Sinusoid(k_shot=5, k_query=5), horizon=6), meta_steps=meta_steps,
        outer_optimizer=torch.optim.Adam(meta.parameters(), lr=1e-2), meta_batch_size=3, inner_steps=2,
        eval_inner_steps=6, eval_n_tasks=10, checkpoint_path=tmp_path / "ckpt.pt", checkpoint_every=2,
        progress=False, log_every=1)


def test_online_training_resumes_bit_exactly(tmp_path):
    """The pool, positions and carried particles are checkpointed: 4 steps, then 3 more after a resume,
    equal 7 steps straight."""
    straight_meta, straight = _online_run(tmp_path / "a", 7)
    _online_run(tmp_path / "b", 4)
    resumed_meta, resumed = _online_run(tmp_path / "b", 7)
    for (k, p), (_, q) in zip(straight_meta.named_parameters(), resumed_meta.named_parameters()):
        assert torch.equal(p, q), k
    assert straight["meta_test_loss"] == resumed["meta_test_loss"]


def test_windowed_tasks_refuse_an_estimator_that_cannot_continue_an_unroll(tmp_path):
    with pytest.raises(ValueError, match="only an online estimator can continue"):
        _online_run(tmp_path, 2, estimator="full")
