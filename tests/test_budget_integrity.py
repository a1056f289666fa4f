"""Budget integrity: chunks are independent, the guard watches backward passes, plans keep their headroom,
and whatever runs under a memory budget measures under it (or was refused before any work)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import metaopt as mo
from metaopt import estimators as E
from metaopt.planning import plan
from metaopt.runner import TaskObjective
from problems import tiny_model, tiny_tasks


def _problem(n_tasks: int = 6, steps: int = 4, hidden: int = 6):
    model = tiny_model(hidden)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
    return loop, mo.meta_params(mo.Init(model)), tiny_tasks(n_tasks, steps)


class Spy(E.Full):
    """Full backprop that remembers a weak reference to each chunk's outer loss (its graph's root)."""

    def __init__(self):
        self.roots: list[weakref.ref] = []
        self.alive_at_start: list[int] = []

    def task_objective(self, loop, meta, task, guard):
        gc.collect()
        self.alive_at_start.append(sum(r() is not None for r in self.roots))
        objective = super().task_objective(loop, meta, task, guard)
        self.roots.append(weakref.ref(objective.outer_loss))
        return TaskObjective(objective.surrogate, objective.outer_loss)


@pytest.mark.parametrize("batching,chunk", [("vmap", 2), ("loop", None)])
def test_no_chunk_graph_is_alive_when_the_next_chunk_starts(batching, chunk):
    loop, meta, tasks = _problem()
    spy = Spy()
    spy(loop, meta, tasks, batching=batching, chunk_size=chunk)
    assert len(spy.alive_at_start) == (3 if batching == "vmap" else 6)
    assert spy.alive_at_start == [0] * len(spy.alive_at_start)


def test_chunked_meta_gradient_equals_one_vmap_and_the_loop():
    loop, meta, tasks = _problem(n_tasks=5)
    whole = E.Full()(loop, meta, tasks)
    for kwargs in ({"chunk_size": 2}, {"chunk_size": 4}, {"batching": "loop"}):
        part = E.Full()(loop, meta, tasks, **kwargs)
        for k, g in whole.grads.items():
            torch.testing.assert_close(part.grads[k], g, rtol=1e-10, atol=1e-12)


class BackwardSpike:
    """A memory probe flat through the forward unroll that jumps after `calls` readings (the backward pass)."""

    def __init__(self, calls: int, spike: int = 10**9):
        self.calls, self.spike, self.n = calls, spike, 0

    def __call__(self) -> int:
        self.n += 1
        return 0 if self.n <= self.calls else self.spike


def test_guard_catches_a_peak_in_the_backward_pass():
    loop, meta, tasks = _problem(n_tasks=2, steps=4)
    # readings: 1 at the start, one per inner step (4); the 6th is the check after the backward pass
    with pytest.raises(mo.BudgetExceeded, match=r"task 0 uses 1 GB, past its memory budget of 1 MB .* in its "
                                                r"backward pass"):
        E.Full()(loop, meta, tasks, mo.Budget(memory="1MB"), batching="loop", memory_probe=BackwardSpike(5))


def test_backward_overrun_skips_or_truncates_under_on_exceed():
    loop, meta, tasks = _problem(n_tasks=2, steps=4)
    skipped = E.Full()(loop, meta, tasks, mo.Budget(memory="1MB", on_exceed="skip"), batching="loop",
                       memory_probe=BackwardSpike(5))
    assert skipped.stats["tasks_skipped"] == 2
    # truncate: the chunk is recomputed on the share of its steps the budget allows (here 1 GB used of a
    # 500 MB budget: 0.9 * 4 * 0.5 -> 1 step), and that retry fits.
    spike = BackwardSpike(5, spike=10**9)
    cut = E.Full()(loop, meta, tasks, mo.Budget(memory="500MB", on_exceed="truncate"), batching="vmap",
                   memory_probe=lambda: spike() if spike.n < 6 else 0)
    assert cut.stats["tasks_truncated"] == 2
    expected = E.Full()(loop, meta, tasks._replace(support=tasks.support[:1]))
    for k, g in expected.grads.items():
        torch.testing.assert_close(cut.grads[k], g, rtol=1e-10, atol=1e-12)


def test_headroom_is_validated_and_recorded():
    with pytest.raises(ValueError, match="headroom must be in"):
        mo.Budget(memory="1MB", headroom=1.0)
    assert mo.Budget(memory="1MB").headroom == 0.1


def _meter(estimator, tasks, batching) -> int:
    steps = (tasks if isinstance(tasks, mo.Task) else tasks[0]).inner_steps
    n = tasks.query.x.shape[0] if isinstance(tasks, mo.Task) else len(tasks)
    return int((1000 + 1000 * steps) * (1 + 0.3 * (n - 1)))


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(500, 60_000), steps=st.integers(1, 12), n_tasks=st.integers(1, 6),
       headroom=st.sampled_from([0.0, 0.1, 0.3]))
def test_no_plan_is_predicted_above_its_headroom(budget, steps, n_tasks, headroom):
    loop, meta, tasks = _problem(n_tasks=n_tasks, steps=steps)
    b = mo.Budget(memory=budget, headroom=headroom)
    try:
        found = plan(E.Full(), loop, meta, tasks, b, meter=_meter)
    except mo.BudgetExceeded as refused:
        assert "predicts" in str(refused)
        assert _meter(E.Full(), tiny_tasks(1, steps), "loop") > (1 - headroom) * budget
        return
    assert found.predicted_peak_bytes <= (1 - headroom) * budget
    assert f"{1 - headroom:.0%} of the budget" in found.reason


# meta_train's "auto" batching stacks each of them.
ESTIMATORS = {"full": E.Full, "checkpoint": lambda: E.Checkpoint(segment=4), "first_order": E.FirstOrder,
              "truncated": lambda: E.Truncated(k=10), "auto": mo.Auto}


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(name=st.sampled_from(sorted(ESTIMATORS)), steps=st.sampled_from([40, 100]),
       n_tasks=st.sampled_from([4, 8]), fraction=st.sampled_from([1.0, 0.5, 0.34, 0.15]))
def test_whatever_runs_measures_under_its_budget(name, steps, n_tasks, fraction, tmp_path_factory):
    """Real memory: a budget a fraction of full's measured need either is refused before any work, or
    the run's measured peak (every chunk, forward and backward, the optimizer step) stays under it."""
    torch.manual_seed(0)
    model = mo.MLP(1, (40, 40), 1)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.01), mo.losses.mse)

    def train(estimator, budget):
        meta = mo.meta_params(mo.Init(model))
        return mo.meta_train(loop, meta, estimator, mo.Sinusoid(k_shot=10),
                             outer_optimizer=torch.optim.Adam(meta.parameters()), meta_steps=2,
                             meta_batch_size=n_tasks, inner_steps=steps, budget=budget, eval_n_tasks=0,
                             progress=False)

    need = train(E.Full(), mo.Budget())["measured_peak_bytes"]
    # Below a few MB the heap's and pages' granularity (up to ~1 MB: README, memory prediction) is more than the
    # headroom: it flaked at 1.7 MB under load, and at 3.8 MB (3.92 MB measured) beside the rest of `make test`.
    assume(need * fraction >= 5e6)
    budget = mo.Budget(memory=int(need * fraction))
    try:
        metrics = train(ESTIMATORS[name](), budget)
    except mo.BudgetExceeded as refused:
        assert "predicts" in str(refused) or "no estimator fits" in str(refused)
        return
    assert metrics["measured_peak_bytes"] <= budget.memory
    assert metrics["predicted_peak_bytes"] <= (1 - budget.headroom) * budget.memory
