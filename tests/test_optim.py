"""Inner optimizers: equal torch.optim step by step, and differentiable in every input."""
from __future__ import annotations

import pytest
import torch

import metaopt as mo
from metaopt.optim import hyper_for

# (metaopt optimizer, equivalent torch.optim constructor) at the same hyperparameters.
CASES = {
    "sgd": (lambda: mo.optim.sgd(lr=0.1, weight_decay=0.01),
            lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01)),
    "momentum": (lambda: mo.optim.momentum(lr=0.1, momentum=0.8),
                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8)),
    "nesterov": (lambda: mo.optim.momentum(lr=0.1, momentum=0.8, nesterov=True),
                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True)),
    "adam": (lambda: mo.optim.adam(lr=0.05, eps_root=0.0, weight_decay=0.01),
             lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.01)),
}


def _quadratic_grads(params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    # A deterministic, parameter-dependent gradient field that changes every step.
    return {k: torch.sin(p * (step + 1)) + p ** 2 for k, p in params.items()}


@pytest.mark.parametrize("name", CASES)
def test_matches_torch_optim_over_steps(name):
    make, make_torch = CASES[name]
    start = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    torch_params = [torch.nn.Parameter(v.clone()) for v in start.values()]
    torch_opt = make_torch(torch_params)
    opt = make()
    params, state = dict(start), opt.init(start)
    for step in range(5):
        grads = _quadratic_grads(params, step)
        params, state = opt.update(params, grads, state, {})
        for p, g in zip(torch_params, _quadratic_grads(dict(zip(start, torch_params)), step).values()):
            p.grad = g.detach()
        torch_opt.step()
    for (k, v), p in zip(params.items(), torch_params):
        torch.testing.assert_close(v, p.detach(), rtol=1e-12, atol=1e-12, msg=f"{name}: {k} differs")


@pytest.mark.parametrize("name", CASES)
def test_update_gradcheck_in_params_grads_state_and_hyper(name):
    opt = CASES[name][0]()
    keys = ["w", "b"]
    shapes = {"w": (2, 3), "b": (3,)}
    params = {k: torch.randn(shapes[k], requires_grad=True) for k in keys}
    grads = {k: torch.randn(shapes[k], requires_grad=True) for k in keys}
    # Take one step first so that the optimizer state is non-trivial.
    _, state = opt.update({k: v.detach() for k, v in params.items()},
                          {k: torch.randn(shapes[k]) for k in keys}, opt.init(params), {})
    state_leaves, spec = torch.utils._pytree.tree_flatten(state)
    state_leaves = [v.detach().clone().requires_grad_(v.is_floating_point() and v.dim() > 0) for v in state_leaves]
    lr_per_tensor = {k: torch.tensor(0.07, requires_grad=True) for k in keys}

    def f(*flat):
        p = dict(zip(keys, flat[:2]))
        g = dict(zip(keys, flat[2:4]))
        lrs = dict(zip(keys, flat[4:6]))
        s = torch.utils._pytree.tree_unflatten(list(flat[6:]), spec)
        new, new_state = opt.update(p, g, s, {"lr": lrs})
        return tuple(new.values()) + tuple(v for v in torch.utils._pytree.tree_leaves(new_state) if v.dim() > 0)

    inputs = (*params.values(), *grads.values(), *lr_per_tensor.values(), *state_leaves)
    assert torch.autograd.gradcheck(f, inputs)


def test_hyper_overrides_defaults_and_per_element_lr():
    opt = mo.optim.sgd(lr=1.0)
    params = {"w": torch.ones(2, 2)}
    grads = {"w": torch.ones(2, 2)}
    lr = {"w": torch.tensor([[0.1, 0.2], [0.3, 0.4]])}
    new, _ = opt.update(params, grads, opt.init(params), {"lr": lr})
    torch.testing.assert_close(new["w"], 1 - lr["w"])


def test_hyper_for_names_missing_parameter():
    with pytest.raises(KeyError, match="no entry for parameter 'b'"):
        hyper_for({"w": torch.ones(())}, "b")


def test_adam_second_order_stays_finite_with_zero_gradient_entries():
    opt = mo.optim.adam(lr=0.1)
    p = torch.randn(4, requires_grad=True)
    params, state = {"p": p}, opt.init({"p": p})
    grads = {"p": p * torch.tensor([0.0, 1.0, 0.0, 1.0])}  # some entries exactly zero
    new, _ = opt.update(params, grads, state, {})
    (g,) = torch.autograd.grad(new["p"].sum(), p)
    assert torch.isfinite(g).all()


def test_states_are_typed_and_transforms_compose():
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = mo.optim.adam(lr=0.1).init(params)
    assert isinstance(state[1], mo.optim.AdamState) and state[1].step.dim() == 0
    _, state = mo.optim.adam(lr=0.1).update(params, grads, state, {})
    torch.testing.assert_close(state[1].mu["w"], 0.1 * grads["w"])
    # momentum is add_decayed_weights then trace, descended: the same chain built by hand is the same optimizer.
    by_hand = mo.optim.descend(mo.optim.chain(mo.optim.add_decayed_weights(0.01), mo.optim.trace(0.8)), 0.1, "mine")
    ref = mo.optim.momentum(lr=0.1, momentum=0.8, weight_decay=0.01)
    assert by_hand.defaults == ref.defaults
    a, b = by_hand.update(params, grads, by_hand.init(params), {}), ref.update(params, grads, ref.init(params), {})
    torch.testing.assert_close(a[0], b[0])
    assert isinstance(a[1][1], mo.optim.TraceState)
    with pytest.raises(ValueError, match="momentum"):
        mo.optim.chain(mo.optim.trace(0.5), mo.optim.trace(0.9))
    with pytest.raises(ValueError, match="lr"):
        mo.optim.descend(mo.optim.GradientTransform(lambda p: (), lambda u, s, p, h: (u, s), {"lr": 1.0}), 0.1, "x")


def test_learned_optimizer_keeps_adams_moments():
    """The learned rule composes scale_by_adam: its moments after a few steps are Adam's on the same gradients."""
    model = mo.MLP(3, (4,), 1)
    rule = mo.LearnedOptimizer(model, architecture="mlp", hidden=3, base="adam")
    adam = mo.optim.adam()
    params = {k: v.detach() for k, v in model.named_parameters()}
    mine, theirs = rule.init_state(adam, params), adam.init(params)
    for step in range(3):
        grads = _quadratic_grads(params, step)
        _, mine = rule.update(adam, params, grads, mine, {})
        _, theirs = adam.update(params, grads, theirs, {})
    for k in params:
        torch.testing.assert_close(mine.adam.nu[k], theirs[1].nu[k])
        torch.testing.assert_close(mine.adam.mu[k], theirs[1].mu[k])
    assert len(mine.momenta) == len(rule.decays) and not mine.h
    with pytest.raises(TypeError, match="init_state"):
        rule.update(adam, params, grads, theirs, {})
