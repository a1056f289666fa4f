"""Proto-MAML: a ProtoNet at inner lr 0; its meta-gradient equals a hand-written one and finite differences."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metaopt as mo
from metaopt.batching import task_count
from problems import central_difference


def _setup(n_way: int = 3, lr: float = 0.3, loop_way: int | None = None, steps: int = 2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    loop = mo.ProtoMAMLLoop(model, mo.optim.sgd(lr=lr), n_way=loop_way or n_way)
    tasks = mo.RandomPatterns(n_way=n_way, k_shot=2, k_query=3, size=8).sample(4, steps, torch.Generator().manual_seed(0))
    return model, loop, mo.meta_params(mo.Init(model)), tasks


def _hand_written_meta_gradient(model, tasks, lr: float, n_way: int) -> dict[str, torch.Tensor]:
    """Proto-MAML for each task with torch.autograd and explicit tensors, averaged over the tasks."""
    init = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    total = 0.0
    for task in mo.unstack_tasks(tasks):
        def embed(body, x):
            return torch.func.functional_call(model, body, (x,))
        support = task.support[0]
        prototypes = torch.stack([embed(init, support.x)[support.y == k].mean(0) for k in range(n_way)])
        # Clones: the inner gradient is the partial one in body and head (the head is its own parameter once
        # made); with `init` itself autograd would add the path through the prototypes to the body's gradient.
        body, weight, bias = {k: v.clone() for k, v in init.items()}, 2 * prototypes, -(prototypes ** 2).sum(-1)
        for batch in task.support:
            loss = F.cross_entropy(embed(body, batch.x) @ weight.T + bias, batch.y)
            grads = torch.autograd.grad(loss, [*body.values(), weight, bias], create_graph=True)
            body = {k: v - lr * g for (k, v), g in zip(body.items(), grads)}
            weight, bias = weight - lr * grads[-2], bias - lr * grads[-1]
        total = total + F.cross_entropy(embed(body, task.query.x) @ weight.T + bias, task.query.y)
    grads = torch.autograd.grad(total / task_count(tasks), list(init.values()))  # the mean over tasks
    return {"init.params." + k.replace(".", "/"): g for k, g in zip(init, grads)}


def test_meta_gradient_equals_a_hand_written_proto_maml_and_finite_differences(generator):
    model, loop, meta, tasks = _setup()
    result = mo.Full()(loop, meta, tasks)
    expected = _hand_written_meta_gradient(model, tasks, lr=0.3, n_way=3)
    assert set(result.grads) == set(expected)
    for k, g in expected.items():
        torch.testing.assert_close(result.grads[k], g, rtol=1e-9, atol=1e-12)
    looped = mo.Full()(loop, meta, tasks, batching="loop")
    for k, g in result.grads.items():
        torch.testing.assert_close(looped.grads[k], g, rtol=1e-10, atol=1e-12)
    direction = {k: torch.randn(p.shape, generator=generator) for k, p in meta.named_parameters()}
    analytic = sum((result.grads[k] * d).sum() for k, d in direction.items()).item()
    assert analytic == pytest.approx(central_difference(loop, meta, tasks, direction), rel=1e-6)


def test_with_a_zero_inner_lr_it_is_a_protonet():
    model, loop, meta, tasks = _setup(lr=0.0, steps=1)
    protonet = mo.Full()(mo.PrototypeLoop(model, n_way=3), meta, tasks)
    proto_maml = mo.Full()(loop, meta, tasks)
    torch.testing.assert_close(proto_maml.outer_loss, protonet.outer_loss, rtol=1e-10, atol=1e-12)
    for k, g in protonet.grads.items():
        torch.testing.assert_close(proto_maml.grads[k], g, rtol=1e-8, atol=1e-12)


def test_a_wider_loop_scores_fewer_way_tasks_as_their_own():
    _, loop, meta, tasks = _setup(n_way=3)
    _, wide, _, _ = _setup(n_way=3, loop_way=5)
    own, wider = mo.Full()(loop, meta, tasks), mo.Full()(wide, meta, tasks)
    torch.testing.assert_close(wider.task_losses, own.task_losses, rtol=1e-10, atol=1e-12)
    for k, g in own.grads.items():
        torch.testing.assert_close(wider.grads[k], g, rtol=1e-9, atol=1e-12)
    first = mo.unstack_tasks(tasks)[0]
    adapted = mo.unroll(wide, wide.init(meta), first.support, meta)
    assert (wide.predict(adapted, first.query.x).softmax(-1)[:, 3:] == 0).all()


@pytest.mark.parametrize("kind", ["protonet", "protomaml"])
def test_with_n_way_is_the_loop_built_for_those_ways(kind):
    """`with_n_way` (how an evaluation protocol gets a loop for its ways) answers as the loop built with them,
    shares the model and leaves the original as it was; fewer than 2 ways are refused."""
    model, _, meta, tasks = _setup(n_way=3, steps=1)
    build = {"protonet": lambda n: mo.PrototypeLoop(model, n_way=n),
             "protomaml": lambda n: mo.ProtoMAMLLoop(model, mo.optim.sgd(lr=0.3), n_way=n)}[kind]
    wide = build(60)
    narrow = wide.with_n_way(3)
    assert (type(narrow), narrow.n_way, wide.n_way) == (type(wide), 3, 60) and narrow.model is model
    first = mo.unstack_tasks(tasks)[0]
    own = build(3)
    logits = [loop.predict(mo.unroll(loop, loop.init(meta), first.support, meta), first.query.x)
              for loop in (narrow, own)]
    assert logits[0].shape == (first.query.x.shape[0], 3)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="n_way must be >= 2"):
        wide.with_n_way(1)


def test_refuses_meta_parameters_keyed_by_the_models_parameters_and_predicting_before_a_step():
    model, loop, meta, tasks = _setup()
    with pytest.raises(ValueError, match="has no entry for it; use a plain inner optimizer"):
        mo.Full()(loop, mo.meta_params(mo.Init(model), mo.LearningRates(model)), tasks)
    with pytest.raises(ValueError, match="needs inner_steps >= 1"):
        loop.predict(loop.init(meta), mo.unstack_tasks(tasks)[0].query.x)
    with pytest.raises(ValueError, match="n_way must be >= 2"):
        mo.ProtoMAMLLoop(model, mo.optim.sgd(lr=0.1), n_way=1)


def test_proto_maml_meta_training_raises_accuracy():
    _, loop, meta, _ = _setup(n_way=3, lr=0.1)
    tasks = mo.RandomPatterns(n_way=3, k_shot=2, k_query=3, size=8, noise=0.5)
    before = mo.evaluate(loop, meta, tasks, n_tasks=100)["test_accuracy"]
    metrics = mo.meta_train(loop, meta, mo.Full(), tasks, outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-2),
                            meta_steps=60, meta_batch_size=8, eval_n_tasks=100, progress=False)
    assert metrics["test_accuracy"] > before + 0.05
