"""Test-time support tuning of a ProtoNet: equal to a hand-written torch.optim.Adam loop; vmaps; evaluation only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metaopt as mo
from metaopt.ensemble import ProtoNetEnsemble, ensemble_meta
from metaopt.support_tuning import SupportTuning, tune_on_support


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def _tasks(count: int = 4) -> mo.Task:
    return mo.RandomPatterns(n_way=3, k_shot=2, k_query=3, size=8).sample(count, 1, torch.Generator().manual_seed(0))


def test_tuning_equals_a_hand_written_adam_loop():
    """float64: the tuned parameters equal torch.optim.Adam's on the same loss, written out with torch's own ops
    (boolean-mask class means, cdist, grid_sample on the bank's maps); the initialization is left unchanged."""
    tuning = SupportTuning(steps=4, lr=0.05, copies=2, bank=7, shift=1.5)
    with torch.device("cpu"):
        model = _net(0).double()
        support = mo.unstack_tasks(_tasks(1))[0].support[0]
        x, y = support.x.double(), support.y
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        tuned = tune_on_support(lambda p, images: torch.func.functional_call(model, p, (images,)), start,
                                mo.Batch(x, y), 3, tuning)

        reference = _net(0).double()
        optimizer = torch.optim.Adam(reference.parameters(), lr=tuning.lr)
        theta = tuning.thetas(8)
        copies, labels = torch.cat([x, x]), torch.cat([y, y])
        for step in range(tuning.steps):
            index = [(step * 12 + i) % 7 for i in range(12)]
            grid = F.affine_grid(theta[index], list(copies.shape), align_corners=False)
            queries = F.grid_sample(copies, grid, align_corners=False)
            prototypes = torch.stack([reference(x)[y == k].mean(0) for k in range(3)])
            loss = F.cross_entropy(-torch.cdist(reference(queries), prototypes) ** 2, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(tuned[name], p.detach(), rtol=1e-6, atol=1e-9)
        assert not torch.equal(tuned[name], start[name]) and not tuned[name].requires_grad
    torch.testing.assert_close(start, {k: v.detach() for k, v in _net(0).double().named_parameters()})
    assert theta[:, :, 2].abs().max() <= 1.5 * 2 / 8 and theta[:, :, 2].abs().max() > 0.5 * 2 / 8
    torch.testing.assert_close(tuning.thetas(8), theta)  # the bank is drawn from its seed alone


def test_a_tuning_loop_evaluates_vmapped_as_task_by_task_and_only_evaluates():
    """`evaluate` vmaps a tuning ProtoNet (fused BatchNorm conv4 included) as it runs the tasks one at a time; the
    tuning changes the answers; a meta-gradient through it is refused; ensembles tune every member."""
    model = mo.Conv4(1, 0, channels=4, image_size=28, norm="fused")
    loop = mo.PrototypeLoop(model, n_way=3)
    meta = mo.meta_params(mo.Init(model))
    tasks = mo.RandomPatterns(n_way=3, k_shot=1, k_query=4, size=28, noise=0.5)
    tuned = loop.with_support_tuning(SupportTuning(steps=3, lr=0.05))
    kwargs = dict(n_tasks=6, batch_size=6, return_per_task=True)
    vmapped, looped, plain = (mo.evaluate(each, meta, tasks, batching=batching, **kwargs)  # type: ignore[arg-type]
                              for each, batching in ((tuned, "vmap"), (tuned, "loop"), (loop, "vmap")))
    torch.testing.assert_close(vmapped["task_losses"], looped["task_losses"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(vmapped["task_losses"], plain["task_losses"])
    assert loop.support_tuning is None and loop.with_support_tuning(SupportTuning(steps=0)).support_tuning is None
    task = mo.unstack_tasks(tasks.sample(1, 1, torch.Generator().manual_seed(0)))[0]
    with pytest.raises(ValueError, match="support_tuning is for evaluation"):
        mo.Full()(tuned, meta, tasks.sample(2, 1, torch.Generator().manual_seed(0)))
    ensemble = ProtoNetEnsemble([(loop, meta)]).with_support_tuning(SupportTuning(steps=3, lr=0.05))
    assert all(member.support_tuning == SupportTuning(steps=3, lr=0.05) for member, _ in ensemble.members)
    state = ensemble.step(ensemble.init(ensemble_meta([meta])), task.support[0], meta, create_graph=False)
    alone = tuned.step(tuned.init(meta), task.support[0], meta, create_graph=False)
    torch.testing.assert_close(state[0].params, alone.params)


def test_bad_tuning_settings_are_refused():
    with pytest.raises(ValueError, match="steps >= 0"):
        SupportTuning(steps=-1)
    with pytest.raises(ValueError, match="lr > 0"):
        SupportTuning(lr=0.0)
