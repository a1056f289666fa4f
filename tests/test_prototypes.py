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


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_checkpoint_equals_full_on_a_protonet_whose_state_holds_a_bool_mask(batching):
    """A ProtoNet's inner state holds which classes are present (bool): checkpoint's pullbacks differentiate the
    state's floating-point tensors only (before, `torch.func.vjp` refused the mask: "only Tensors of floating point
    dtype can require gradients", e.g. `experiment=omniglot_protonet estimator=auto budget.memory=200MB`)."""
    _, loop, meta, tasks = _setup()
    tasks = tasks._replace(support=tasks.support * 3)  # T=3: segments of one step, states carried between them
    reference = mo.Full()(loop, meta, tasks, batching=batching)
    result = mo.Checkpoint(segment=1)(loop, meta, tasks, batching=batching)
    torch.testing.assert_close(result.outer_loss, reference.outer_loss, rtol=1e-12, atol=0)
    for k, g in reference.grads.items():
        assert g.abs().max() > 0, k
        torch.testing.assert_close(result.grads[k], g, rtol=1e-10, atol=1e-12)


def test_protonet_meta_training_raises_accuracy():
    _, loop, meta, _ = _setup(n_way=3)
    tasks = mo.RandomPatterns(n_way=3, k_shot=2, k_query=3, size=8, noise=0.5)
    before = mo.evaluate(loop, meta, tasks, n_tasks=100)["test_accuracy"]
    metrics = mo.meta_train(loop, meta, mo.Full(), tasks, outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-2),
                            meta_steps=60, meta_batch_size=8, eval_n_tasks=100, progress=False)
    assert metrics["test_accuracy"] > before + 0.05 and 0 <= metrics["test_accuracy_ci95"] < 0.1


def test_an_ensemble_sums_its_members_mean_normalized_squared_distances():
    """`ProtoNetEnsemble`'s logits against a hand computation (cdist, each member's distances over their mean
    over the task's queries and classes); a 60-way ensemble scores the 3-class tasks as a 3-way one (absent classes
    at the lowest logit); `evaluate` scores it on vmapped tasks as task by task; members must be ProtoNets."""
    from metaopt.ensemble import ProtoNetEnsemble, ensemble_meta
    from metaopt.optim import sgd
    model, loop, meta, tasks = _setup()
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    members = [(loop, meta), (mo.PrototypeLoop(other, n_way=3), mo.meta_params(mo.Init(other)))]
    with torch.no_grad():
        other[-1].weight.mul_(10.0)  # another scale: without the normalization it would outvote the first
    ensemble, wide = ProtoNetEnsemble(members), ProtoNetEnsemble(members).with_n_way(60)
    for task in mo.unstack_tasks(tasks):
        support, query = task.support[0], task.query
        expected = torch.zeros(query.x.shape[0], 3)
        for net in (model, other):
            prototypes = torch.stack([net(support.x)[support.y == k].mean(0) for k in range(3)])
            distances = torch.cdist(net(query.x), prototypes) ** 2
            expected -= distances / distances.mean()
        for each in (ensemble, wide):
            state = each.step(each.init(ensemble_meta([m for _, m in members])), support, meta)
            logits = each.predict(state, query.x)
            torch.testing.assert_close(logits[:, :3], expected, rtol=1e-5, atol=1e-5)
        assert logits.shape == (query.x.shape[0], 60) and torch.softmax(logits, -1)[:, 3:].max() == 0
    both = ensemble_meta([m for _, m in members])
    scores = [mo.evaluate(ensemble, both, mo.RandomPatterns(n_way=3, k_shot=2, k_query=3, size=8), n_tasks=8,
                          batch_size=8, batching=batching, return_per_task=True)["task_accuracies"]
              for batching in ("vmap", "loop")]
    torch.testing.assert_close(scores[0], scores[1])
    maml = mo.InnerLoop(model, sgd(lr=0.1), mo.losses.cross_entropy)
    with pytest.raises(ValueError, match="PrototypeLoops"):
        ProtoNetEnsemble([(maml, meta)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="different numbers of classes"):
        ProtoNetEnsemble([members[0], (mo.PrototypeLoop(other, n_way=5), members[1][1])])
