"""ClassifierLoop (supervised pretraining): its training gradient is the plain cross-entropy gradient of the whole
classifier, and it evaluates as a ProtoNet on the embedding before the head."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metaopt as mo
from metaopt.class_means import PrototypeState
from problems import central_difference

CLASSES = 7


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = mo.Conv4(1, CLASSES, channels=4, image_size=16)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((2, 12, 1, 16, 16), generator=g)  # two training batches of 12 images: global labels 0..6
    y = torch.randint(CLASSES, (2, 12), generator=g)
    tasks = mo.Task.repeat(mo.Batch(x[:, :0], y[:, :0]), mo.Batch(x, y), 0)  # no inner step
    return model, mo.ClassifierLoop(model, n_way=3), mo.meta_params(mo.Init(model)), tasks


def test_training_gradient_is_the_plain_cross_entropy_gradient_and_finite_differences(generator):
    model, loop, meta, tasks = _setup()
    result = mo.Full()(loop, meta, tasks)
    params = dict(model.named_parameters())
    # Independent reference: the module itself under autograd, the mean of the two batches' cross-entropies.
    loss = sum(F.cross_entropy(model(tasks.query.x[i]), tasks.query.y[i]) for i in range(2)) / 2
    expected = torch.autograd.grad(loss, list(params.values()))
    assert {k.removeprefix("init.params.") for k in result.grads} == {k.replace(".", "/") for k in params}
    for (name, _), g in zip(params.items(), expected):
        torch.testing.assert_close(result.grads["init.params." + name.replace(".", "/")], g, rtol=1e-9, atol=1e-12)
    assert any(g.abs().sum() > 0 for k, g in result.grads.items() if "head" in k)  # the head trains
    direction = {k: torch.randn(p.shape, generator=generator) for k, p in meta.named_parameters()}
    analytic = sum((result.grads[k] * d).sum() for k, d in direction.items()).item()
    assert analytic == pytest.approx(central_difference(loop, meta, tasks, direction), rel=1e-6)


def test_evaluation_is_a_protonet_on_the_embedding_before_the_head():
    model, loop, meta, _ = _setup()
    g = torch.Generator().manual_seed(3)
    support = mo.Batch(torch.rand((6, 1, 16, 16), generator=g), torch.tensor([0, 0, 1, 1, 2, 2]))
    queries = torch.rand((5, 1, 16, 16), generator=g)
    state = loop.step(loop.init(meta), support, meta, create_graph=False)
    assert isinstance(state.opt_state, PrototypeState)
    with torch.no_grad():  # by hand: the features before the head, class means, minus squared distances
        embedded = model.features(support.x)
        prototypes = torch.stack([embedded[support.y == k].mean(0) for k in range(3)])
        expected = -torch.cdist(model.features(queries), prototypes) ** 2
    torch.testing.assert_close(loop.predict(state, queries), expected, rtol=1e-9, atol=1e-9)
    # The same answers as a ProtoNet whose embedding network is the backbone alone (no head at all).
    body = mo.Conv4(1, 0, channels=4, image_size=16)
    body.features.load_state_dict(model.features.state_dict())
    protonet, protonet_meta = mo.PrototypeLoop(body, n_way=3), mo.meta_params(mo.Init(body))
    other = protonet.step(protonet.init(protonet_meta), support, protonet_meta, create_graph=False)
    torch.testing.assert_close(loop.predict(state, queries), protonet.predict(other, queries), rtol=1e-9, atol=1e-9)
    # Meta-test losses after the support step are the ProtoNet's, not the head's.
    query = mo.Batch(queries, torch.tensor([0, 1, 2, 0, 1]))
    torch.testing.assert_close(loop.outer_loss(state, query, meta), F.cross_entropy(expected, query.y))


def test_clear_errors():
    with pytest.raises(ValueError, match="takes no `embed` argument"):
        mo.ClassifierLoop(mo.MLP(4, (8,), 3))
    model, loop, meta, _ = _setup()
    batch = mo.Batch(torch.rand((3, 1, 16, 16)), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="inner_steps=0"):
        loop.step(loop.init(meta), batch, meta)  # a meta-gradient through a support step: training has none
