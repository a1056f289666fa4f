"""Implicit differentiation equals full backprop where the inner problem converges, and says when it does not."""
from __future__ import annotations

import pytest
import torch

import metaopt as mo


def _converging_problem(kind: str, inner_steps: int = 300):
    """Linear regression (strongly convex with a proximal term or weight decay), gradient descent to convergence."""
    torch.manual_seed(0)
    model = mo.MLP(1, (), 1)  # linear: y = w x + b
    proximal = 1.0 if kind == "init" else 0.0
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse, proximal=proximal)
    meta = mo.meta_params(mo.Init(model)) if kind == "init" else mo.meta_params(mo.WeightDecay(model, init=0.5))
    tasks = mo.Sinusoid(k_shot=6, k_query=9).sample(3, inner_steps, torch.Generator().manual_seed(0))
    return loop, meta, tasks


@pytest.mark.parametrize("solver", ["cg", "neumann"])
@pytest.mark.parametrize("kind", ["init", "weight_decay"])
def test_implicit_equals_full_at_convergence(kind, solver):
    loop, meta, tasks = _converging_problem(kind)
    estimator = mo.estimators.Implicit(solver=solver, iters=10 if solver == "cg" else 400, neumann_alpha=0.05)
    result = estimator(loop, meta, tasks)
    reference = mo.Full()(loop, meta, tasks)
    assert result.stats["residual_max"] < 1e-8 and result.stats["stationarity_max"] < 1e-8
    for k, g in reference.grads.items():
        torch.testing.assert_close(result.grads[k], g, rtol=1e-6, atol=1e-10)


def test_implicit_reports_an_unconverged_inner_loop():
    loop, meta, tasks = _converging_problem("init", inner_steps=3)
    result = mo.estimators.Implicit()(loop, meta, tasks)
    assert result.stats["stationarity_max"] > 1e-2  # far from a stationary point: the figure says so


def test_imaml_gradient_is_lambda_times_the_solve():
    """For the initialization: grad = lambda (H + lambda I)^{-1} grad_outer, checked with a dense solve."""
    loop, meta, tasks = _converging_problem("init")
    task = mo.unstack_tasks(tasks)[0]
    result = mo.estimators.Implicit()(loop, meta, [task]).grads
    with torch.no_grad():
        state = mo.unroll(loop, loop.init(meta), task.support, meta, create_graph=False)
    names = list(state.params)
    flat = torch.cat([state.params[k].flatten() for k in names])

    def unflatten(v):
        out, i = {}, 0
        for k in names:
            n = state.params[k].numel()
            out[k] = v[i:i + n].view_as(state.params[k])
            i += n
        return out

    def support_loss(v):
        return mo.losses.mse(torch.func.functional_call(loop.model, unflatten(v), (task.support[0].x,)),
                             task.support[0].y)

    hessian = torch.autograd.functional.hessian(support_loss, flat)
    outer = torch.func.grad(lambda v: mo.losses.mse(torch.func.functional_call(loop.model, unflatten(v),
                                                                               (task.query.x,)), task.query.y))(flat)
    expected = torch.linalg.solve(hessian + torch.eye(len(flat)), outer)  # lambda = 1
    got = torch.cat([result["init.params." + k.replace(".", "/")].flatten() for k in names])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-10)


def test_implicit_refuses_what_it_cannot_serve():
    model = mo.MLP(1, (), 1)
    loop = mo.InnerLoop(model, mo.optim.sgd(), mo.losses.mse)
    tasks = mo.Sinusoid().sample(1, 2, torch.Generator().manual_seed(0))
    with pytest.raises(mo.EstimatorUnsupported, match=r"needs InnerLoop\(proximal=lambda > 0\)"):
        mo.estimators.Implicit()(loop, mo.meta_params(mo.Init(model)), tasks)
    with pytest.raises(mo.EstimatorUnsupported, match=r"in slot 'optimizer': an update rule"):
        mo.estimators.Implicit()(loop, mo.meta_params(mo.LearningRates(model)), tasks)
