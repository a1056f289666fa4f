"""`smallest_indices` draws what `argsort` drew, ties included, so every seeded sampler draws the tasks it always
drew (README's figures were trained on them)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaopt.tasks.omniglot import DRAWERS, Omniglot, OmniglotImages
from metaopt.tasks.ranking import smallest_indices


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 300), n=st.integers(1, 300), levels=st.sampled_from([2, 7, 10**6]),
       seed=st.integers(0, 2**31 - 1))
def test_smallest_indices_equals_argsort_even_among_ties(rows, width, n, levels, seed):
    """Scores drawn from few levels tie everywhere (the argsort fallback), from many levels rarely (topk)."""
    n = min(n, width)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(levels, (rows, 2, width), generator=g).to(torch.float32) / levels
    assert torch.equal(smallest_indices(scores, n), scores.argsort(dim=-1)[..., :n])


def test_smallest_indices_on_float32_random_scores_as_omniglot_draws_them():
    """Omniglot's shape (16 tasks x 3856 classes, 60-way; within-alphabet offsets): 200 batches, some with ties
    among the smallest scores, all equal to argsort's pick."""
    g = torch.Generator().manual_seed(0)
    members = torch.rand((30, 3856), generator=g) < 0.05
    tied = 0
    for trial in range(200):
        scores = torch.rand((16, 3856), generator=g, dtype=torch.float32)  # the suite defaults to float64
        if trial % 2:
            scores = scores + (~members[torch.randint(30, (16,), generator=g)]).to(scores.dtype)
        values = scores.topk(61, dim=1, largest=False).values
        tied += int((values[:, 1:] == values[:, :-1]).any())
        assert torch.equal(smallest_indices(scores, 60), scores.argsort(dim=1)[:, :60])
    assert tied > 0  # the fallback was exercised


def test_omniglot_draws_the_tasks_argsort_drew():
    """`Omniglot.draw` against the same draw computed with argsort, the way it was written before (3000 classes:
    some of the 40 batches tie among their smallest scores)."""
    torch.set_default_dtype(torch.float32)  # training's scores (the fixture restores float64)
    images = torch.zeros((750, DRAWERS, 4, 4), dtype=torch.uint8)
    names = [f"alphabet{i % 5}" for i in range(750)]
    data = OmniglotImages(images, names, [f"{a}/c{i}" for i, a in enumerate(names)], ["background"] * 750)
    tasks = Omniglot(data, size=4, split_by="character", val_fraction=0.0, test_fraction=0.0, n_way=20, k_shot=1,
                     k_query=2)

    def by_argsort(n_tasks, generator):
        n, per_class = tasks.n_way, tasks.k_shot + tasks.k_query
        classes = torch.rand((n_tasks, tasks.num_classes), generator=generator).argsort(dim=1)[:, :n]
        drawers = torch.rand((n_tasks, n, DRAWERS), generator=generator).argsort(dim=2)[:, :, :per_class]
        return classes, drawers

    for seed in range(40):
        got = tasks.draw(16, torch.Generator().manual_seed(seed))
        want = by_argsort(16, torch.Generator().manual_seed(seed))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
