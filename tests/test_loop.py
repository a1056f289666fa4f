"""The inner loop: one step equals a hand-written functional step; state handling."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import metaopt as mo
from problems import tiny_model, tiny_tasks


def test_step_equals_hand_written_sgd_step():
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.3), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    task = mo.unstack_tasks(tiny_tasks(1, 1))[0]
    state = loop.step(loop.init(meta), task.support[0], meta)

    params = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    pred = torch.func.functional_call(model, params, (task.support[0].x,))
    grads = torch.autograd.grad(((pred - task.support[0].y) ** 2).mean(), list(params.values()))
    for (k, p), g in zip(params.items(), grads):
        torch.testing.assert_close(state.params[k], p - 0.3 * g, rtol=1e-12, atol=1e-12)


def test_model_is_never_modified():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.3), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    mo.Full()(loop, meta, tiny_tasks(3, 2))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_without_init_slot_starts_from_model_parameters_detached():
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(), mo.losses.mse)
    meta = mo.meta_params(mo.LearningRates(model))
    state = loop.init(meta)
    for k, p in model.named_parameters():
        assert torch.equal(state.params[k], p) and not state.params[k].requires_grad


def test_detach_state_leaves_no_path_to_meta():
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.momentum(lr=0.1), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model), mo.LearningRates(model))
    task = mo.unstack_tasks(tiny_tasks(1, 2))[0]
    state = mo.unroll(loop, loop.init(meta), task.support, meta)
    detached = mo.detach_state(state)
    leaves = torch.utils._pytree.tree_leaves(detached)
    assert leaves and all(not v.requires_grad for v in leaves)
    assert all(v.requires_grad for v in state.params.values())


def test_unroll_calls_hook_after_every_step():
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    seen = []
    task = mo.unstack_tasks(tiny_tasks(1, 4))[0]
    mo.unroll(loop, loop.init(meta), task.support, meta, on_step=lambda t, s: seen.append(t))
    assert seen == [0, 1, 2, 3]


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.lin(x))))


def test_buffers_are_explicit_state():
    model = BatchNormNet()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    task = mo.unstack_tasks(tiny_tasks(1, 3))[0]
    state0 = loop.init(meta)
    state = mo.unroll(loop, state0, task.support, meta)
    # Running statistics moved in the inner state (three updates), but not in the model.
    assert state.buffers["bn.num_batches_tracked"].item() == 3
    assert model.bn.num_batches_tracked.item() == 0
    assert not torch.equal(state.buffers["bn.running_mean"], model.bn.running_mean)



def test_check_rejects_unknown_slot_and_wrong_init():
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(), mo.losses.mse)
    meta = nn.ModuleDict({"weird": mo.Init(model)})
    with pytest.raises(ValueError, match="unknown meta-parameter slot"):
        loop.check(meta)
    other = mo.meta_params(mo.Init(tiny_model(hidden=3)))
    with pytest.raises(ValueError, match="meta 'init' gives parameters"):
        loop.check(other)


def test_meta_params_rejects_two_kinds_for_one_slot():
    model = tiny_model()
    with pytest.raises(ValueError, match="two meta-parameters for slot 'init'"):
        mo.meta_params(mo.Init(model), mo.Init(model))
