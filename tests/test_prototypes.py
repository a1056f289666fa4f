"""ProtoNets: logits equal a hand computation; its meta-gradient equals finite differences; it learns."""
from __future__ import annotations

import pytest
import torch

import metaopt as mo
from problems import central_difference


def _setup(n_way: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    loop = mo.PrototypeLoop(model, n_way=n_way)
    tasks = mo.RandomPatterns(n_way=n_way, k_shot=2, k_query=3, size=8).sample(4, 1, torch.Generator().manual_seed(0))
    return model, loop, mo.meta_params(mo.Init(model)), tasks


def test_logits_are_negative_squared_distances_to_class_means():
    model, loop, meta, tasks = _setup()
    task = mo.unstack_tasks(tasks)[0]
    state = loop.step(loop.init(meta), task.support[0], meta)
    support = model(task.support[0].x)
    prototypes = torch.stack([support[task.support[0].y == k].mean(0) for k in range(3)])
    query = model(task.query.x)
    expected = -torch.cdist(query, prototypes) ** 2
    torch.testing.assert_close(loop.predict(state, task.query.x), expected, rtol=1e-9, atol=1e-9)


def test_full_meta_gradient_equals_finite_differences_and_vmap_equals_loop(generator):
    _, loop, meta, tasks = _setup()
    result = mo.Full()(loop, meta, tasks)
    direction = {k: torch.randn(p.shape, generator=generator) for k, p in meta.named_parameters()}
    analytic = sum((result.grads[k] * d).sum() for k, d in direction.items()).item()
    assert analytic == pytest.approx(central_difference(loop, meta, tasks, direction), rel=1e-6)
    looped = mo.Full()(loop, meta, tasks, batching="loop")
    for k, g in result.grads.items():
        torch.testing.assert_close(looped.grads[k], g, rtol=1e-10, atol=1e-12)


def test_protonet_meta_training_raises_accuracy():
    _, loop, meta, _ = _setup(n_way=3)
    tasks = mo.RandomPatterns(n_way=3, k_shot=2, k_query=3, size=8, noise=0.5)
    before = mo.evaluate(loop, meta, tasks, n_tasks=100)["test_accuracy"]
    metrics = mo.meta_train(loop, meta, mo.Full(), tasks, outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-2),
                            meta_steps=60, meta_batch_size=8, eval_n_tasks=100, progress=False)
    assert metrics["test_accuracy"] > before + 0.05 and 0 <= metrics["test_accuracy_ci95"] < 0.1
