"""Time budgets are predicted and planned like memory: a chunk's seconds at T are extrapolated from timings at a
few inner steps (`Predictor.predict_seconds`, each estimator's law), chunks shrink until one fits the time budget,
`auto` takes the first estimator that fits both, and what cannot fit is refused before any work (or, under
on_exceed=truncate/skip, planned with the reason saying what the guard will do). Timings here come from a stand-in
timer: no test depends on wall-clock speed."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch.utils._pytree import tree_map_only

import metaopt as mo
from metaopt import estimators as E
from metaopt.batching import compress_support, expand_support
from metaopt.compiled import Compiled
from metaopt.estimators.base import linear_seconds
from metaopt.planning import choose, plan
from metaopt.prediction import Predictor
from problems import tiny_tasks
from test_budget_enforcement import _problem, synthetic_meter

PER_STEP = {E.Full: 1.0, E.Checkpoint: 2.0, E.FirstOrder: 0.25, E.Truncated: 0.5, E.ForwardMode: 10.0,
            E.Implicit: 0.5}  # seconds per inner step of one task


def synthetic_timer(calls: list | None = None):
    """Seconds of a call as if each inner step cost PER_STEP of one task, plus 1 s fixed; a batched chunk costs
    1 + 0.5 (n - 1) tasks' worth (it shares work), tasks one at a time n tasks' worth."""
    def timer(estimator, tasks, batching) -> float:
        steps = (tasks if isinstance(tasks, mo.Task) else tasks[0]).inner_steps
        n = tasks.query.x.shape[0] if isinstance(tasks, mo.Task) else len(tasks)
        if calls is not None:
            calls.append((type(estimator).__name__, steps, n, batching))
        weight = n if batching == "loop" else 1 + 0.5 * (n - 1)
        return weight * (1.0 + PER_STEP[type(estimator)] * steps)
    return timer


def test_linear_seconds_times_short_unrolls_whole_and_extrapolates_long_ones():
    timed: list[int] = []

    def time_at(steps: int) -> float:
        timed.append(steps)
        return 0.5 + 0.1 * steps

    assert linear_seconds(time_at, 20, 16, 32) == pytest.approx(2.5) and timed == [20]
    assert linear_seconds(time_at, 1000, 16, 32) == pytest.approx(100.5) and timed[1:] == [16, 32]
    assert linear_seconds(lambda steps: 2.0 - 0.01 * steps, 100, 16, 32) == pytest.approx(2.0 - 0.32)  # no slope < 0


def test_truncated_times_its_prefix_past_the_differentiated_steps():
    timed: list[int] = []
    E.Truncated(k=50).predict_seconds(lambda steps: timed.append(steps) or 1.0, 200)
    assert timed == [66, 114]


def test_the_predicted_chunk_seconds_follow_the_estimators_law_at_t():
    loop, meta, tasks = _problem(steps=100)
    predictor = Predictor(loop, meta, tasks, meter=synthetic_meter, timer=synthetic_timer())
    assert predictor.predict_seconds(E.Full(), 1) == pytest.approx(1.0 + 100)  # linear: exact for a linear timer
    assert predictor.predict_seconds(E.Full(), 4) == pytest.approx(2.5 * (1.0 + 100))


def test_chunks_shrink_until_one_fits_the_time_budget():
    loop, meta, tasks = _problem(steps=100)  # a chunk of 4: 2.5 x 101 s; of 2: 1.5 x 101 s; one task 101 s
    found = plan(E.Full(), loop, meta, tasks, mo.Budget(time=170), meter=synthetic_meter, timer=synthetic_timer())
    assert (found.batching, found.chunk_size) == ("stacked", 2)
    assert found.predicted_chunk_seconds == pytest.approx(151.5) and found.predicted_chunk_seconds <= 0.9 * 170
    assert "but chunks of 4 tasks predicted 252 s each: stacked chunks of 2" in found.reason
    first_chunk = mo.stack_tasks(mo.unstack_tasks(tasks)[:2])
    assert found.predicted_peak_bytes == synthetic_meter(E.Full(), first_chunk, "stacked")  # the smaller chunk's
    for time in (120, 160):  # 160: a chunk of 2 (151.5 s) is within the budget but not within its 10% headroom
        alone = plan(E.Full(), loop, meta, tasks, mo.Budget(time=time), meter=synthetic_meter, timer=synthetic_timer())
        assert (alone.batching, alone.chunk_size) == ("loop", 1) and alone.predicted_chunk_seconds == pytest.approx(101)


def test_what_cannot_fit_the_time_budget_is_refused_before_any_work():
    loop, meta, tasks = _problem(steps=100)
    with pytest.raises(mo.TimeBudgetExceeded,
                       match=r"full\(\) at T=100: one task predicted 101 s > 45 s = 90% of the time budget 50 s"):
        plan(E.Full(), loop, meta, tasks, mo.Budget(time=50), meter=synthetic_meter, timer=synthetic_timer())


@pytest.mark.parametrize("on_exceed,words", [("truncate", "its unroll will be truncated"),
                                             ("skip", "its tasks will be skipped")])
def test_past_the_time_budget_a_plan_says_what_the_guard_will_do(on_exceed, words):
    loop, meta, tasks = _problem(steps=100)
    found = plan(E.Full(), loop, meta, tasks, mo.Budget(time=50, on_exceed=on_exceed), meter=synthetic_meter,
                 timer=synthetic_timer())
    assert found.chunk_size == 1 and found.predicted_chunk_seconds == pytest.approx(101)
    assert f"one task predicted 101 s > 45 s = 90% of the time budget 50 s: {words} at run time" in found.reason


def test_auto_takes_the_first_estimator_that_fits_memory_and_time():
    loop, meta, tasks = _problem(steps=100)  # one task: full 101 s, checkpoint 201 s, first_order 26 s
    found = choose(loop, meta, tasks, mo.Budget(time=40), meter=synthetic_meter, timer=synthetic_timer())
    assert isinstance(found.estimator, E.FirstOrder) and found.predicted_chunk_seconds <= 40
    assert found.reason.startswith("full() at T=100: one task predicted 101 s > 36 s = 90% of the time budget 40 s; ")
    with pytest.raises(mo.BudgetExceeded, match=r"no estimator fits the budget \(.*, 10 s\) at T=100 \(per task: "
                                                r"full\(\) at T=100: one task predicted 101 s"):
        choose(loop, meta, tasks, mo.Budget(time=10), meter=synthetic_meter, timer=synthetic_timer())


def test_without_a_time_budget_nothing_is_timed_for_it():
    loop, meta, tasks = _problem(steps=100)
    calls: list = []
    found = plan(E.Full(), loop, meta, tasks, mo.Budget(memory=10**6), batching="stacked", meter=synthetic_meter,
                 timer=synthetic_timer(calls))
    assert found.predicted_chunk_seconds is None and calls == []


def test_a_real_prediction_times_the_chunk_that_will_run():
    loop, meta, tasks = _problem(steps=40)
    seconds = Predictor(loop, meta, tasks).predict_seconds(E.Full(), 4)
    assert 0 < seconds < math.inf


def test_meta_train_records_the_predicted_chunk_seconds_and_refuses_before_any_step(tmp_path):
    loop, meta, _ = _problem()
    common = dict(outer_optimizer=torch.optim.Adam(meta.parameters(), lr=1e-3), meta_steps=2, meta_batch_size=4,
                  inner_steps=40, eval_n_tasks=0, progress=False, meter=synthetic_meter, timer=synthetic_timer())
    metrics = mo.meta_train(loop, meta, E.Full(), mo.Sinusoid(k_shot=5), budget=mo.Budget(time=200), **common)
    assert metrics["predicted_chunk_seconds"] == pytest.approx(2.5 * 41) and metrics["meta_steps"] == 2
    with pytest.raises(mo.BudgetExceeded, match="time budget 10 s"):
        mo.meta_train(loop, meta, E.Full(), mo.Sinusoid(k_shot=5), budget=mo.Budget(time=10), **common)


def compiled_timer(calls: list):
    """Seconds of a compiled chunk: 0.01 s per inner step per task (a chunk shares nothing), calls recorded."""
    def timer(estimator, tasks, batching) -> float:
        n, steps = tasks.query.x.shape[0], tasks.inner_steps
        calls.append((type(estimator).__name__, steps, n, batching))
        return 0.01 * steps * n
    return timer


def test_a_compiled_estimator_is_timed_compiled_at_t_and_its_chunks_shrink_to_the_budget():
    """Compiled code is specialized to T: its chunk is timed at T itself (no probes at other T, each of which would
    compile), in the batching it compiles (vmapped, one task too), and shrunk or refused like an eager one."""
    loop, meta, tasks = _problem(steps=100)  # 4 tasks: a chunk of 4 takes 4 s, of 2 2 s, one task 1 s
    calls: list = []
    found = plan(Compiled(E.Full()), loop, meta, tasks, mo.Budget(time=2.5), meter=synthetic_meter,
                 timer=compiled_timer(calls))
    assert (found.batching, found.chunk_size) == ("vmap", 2) and found.predicted_chunk_seconds == pytest.approx(2.0)
    assert calls == [("Compiled", 100, 4, "vmap"), ("Compiled", 100, 2, "vmap")]
    assert "a chunk of 2 tasks measured compiled at T 2 s <= 2.25 s" in found.reason
    assert found.predicted_call_seconds == pytest.approx(4.0)  # two chunks
    alone = plan(Compiled(E.Full()), loop, meta, tasks, mo.Budget(time=1.5), meter=synthetic_meter,
                 timer=compiled_timer(calls))
    assert (alone.batching, alone.chunk_size) == ("vmap", 1)  # one task at a time: a vmap of one task, compiled
    with pytest.raises(mo.TimeBudgetExceeded, match=r"one task measured compiled at T 1 s > 0.9 s"):
        plan(Compiled(E.Full()), loop, meta, tasks, mo.Budget(time=1), meter=synthetic_meter,
             timer=compiled_timer(calls))


def test_a_compiled_chunk_timed_by_the_planner_is_the_one_training_runs():
    """Real calls (a backend without code generation: fast to trace): the planner's timing compiles the chunk once,
    in the layout training's draws have (a query sliced from a larger sample: Dynamo specializes on strides), and
    the training call after it traces nothing more (the compilation is not paid twice; first timed on the tasks
    restacked contiguous, training recompiled at its first step and the guard read the compile as the step's)."""
    loop, meta, tasks = _problem(steps=3)
    compiled = Compiled(E.Full(), backend="aot_eager")
    found = plan(compiled, loop, meta, tasks, mo.Budget(time=60))
    assert found.predicted_chunk_seconds is not None and 0 < found.predicted_chunk_seconds < 54
    assert "measured compiled at T" in found.reason and compiled.compiled and compiled.first_calls == 1
    again = tiny_tasks(4, 3, seed=1)  # another draw of the same shapes and layout
    assert not again.query.x.is_contiguous()  # support and query are slices of one sample
    result = compiled(loop, meta, again, mo.Budget(time=60), batching=found.batching, chunk_size=found.chunk_size)
    assert compiled.first_calls == 1 and result.stats["batching"] == found.batching
    compressed, pattern = compress_support(again)  # the same tasks laid out contiguously: a new compilation, counted
    contiguous = expand_support(tree_map_only(torch.Tensor, torch.Tensor.contiguous, compressed), pattern)
    compiled(loop, meta, contiguous, batching=found.batching, chunk_size=found.chunk_size)
    assert compiled.first_calls == 2


@settings(max_examples=60, deadline=None, derandomize=True)
@given(per_step=st.floats(0.001, 2.0), fixed=st.floats(0.0, 5.0), sharing=st.floats(0.05, 1.0),
       steps=st.integers(1, 300), time=st.floats(0.01, 500.0), n_tasks=st.integers(1, 6))
def test_every_plan_under_a_time_budget_is_predicted_within_it_or_refused(per_step, fixed, sharing, steps, time,
                                                                          n_tasks):
    """Time-budget integrity, as for memory: under on_exceed=raise a plan's chunk is predicted within
    (1 - headroom) x time, at the seconds the timer's law gives that chunk at T; a refusal means one task alone is not."""
    loop, meta, tasks = _problem(n_tasks=n_tasks, steps=steps)

    def seconds(n: int, batching: str, at: int) -> float:
        return (n if batching == "loop" else 1 + sharing * (n - 1)) * (fixed + per_step * at)

    def timer(estimator, chunk_tasks, batching) -> float:
        at = (chunk_tasks if isinstance(chunk_tasks, mo.Task) else chunk_tasks[0]).inner_steps
        n = chunk_tasks.query.x.shape[0] if isinstance(chunk_tasks, mo.Task) else len(chunk_tasks)
        return seconds(n, batching, at)

    budget = mo.Budget(time=time)
    limit = 0.9 * time
    try:
        found = plan(E.Full(), loop, meta, tasks, budget, meter=synthetic_meter, timer=timer)
    except mo.TimeBudgetExceeded as refused:  # (a memory refusal would fail the test: no memory budget here)
        assert seconds(1, "loop", steps) > limit * (1 - 1e-9) and "time budget" in str(refused)
        return
    assert found.predicted_chunk_seconds is not None and found.predicted_chunk_seconds <= limit
    assert found.predicted_chunk_seconds == pytest.approx(seconds(found.chunk_size, found.batching, steps))


def _clocked_seconds(steps: int, n: int) -> float:
    return 0.5 + 0.01 * steps * n + 1e-4 * steps ** 2  # not linear: which probes the line goes through matters


class _ClockedFull(E.Full):
    """`full` whose calls advance a fake clock by `_clocked_seconds` (and compute as usual)."""

    clock = [0.0]  # a class attribute: an estimator describes itself by its constructor's arguments

    def __call__(self, loop, meta, tasks, budget=None, **options):
        steps = (tasks if isinstance(tasks, mo.Task) else tasks[0]).inner_steps
        n = tasks.query.x.shape[0] if isinstance(tasks, mo.Task) else len(tasks)
        self.clock[0] += _clocked_seconds(steps, n)
        return super().__call__(loop, meta, tasks, budget, **options)


@pytest.mark.parametrize("steps", [30, 200])
def test_the_memory_probes_calls_give_the_calls_seconds_at_t(monkeypatch, steps):
    """`Predictor.probed_seconds` and `Plan.predicted_call_seconds`: the calls that measured the memory, timed, and
    extrapolated to T from the two longest (at T = 200: probes at 16, 64, then 50 and 100; at 30: the call at T)."""
    clock = _ClockedFull.clock
    monkeypatch.setattr("metaopt.prediction.time.perf_counter", lambda: clock[0])
    loop, meta, tasks = _problem(steps=steps)
    estimator = _ClockedFull()
    predictor = Predictor(loop, meta, tasks)
    assert predictor.probed_seconds(estimator, 4, 4) is None  # nothing measured yet
    predictor.predict(estimator, 4, 2)
    expected = linear_seconds(lambda t: _clocked_seconds(t, 4), steps, 64, 100)  # the call itself at T = 30
    assert predictor.probed_seconds(estimator, 4, 2) == pytest.approx(expected)
    assert predictor.probed_seconds(estimator, 4, 4) is None  # another configuration
    found = plan(estimator, loop, meta, tasks, mo.Budget(memory=10**9), batching="vmap")
    assert found.predicted_call_seconds == pytest.approx(expected)
    assert plan(E.Full(), loop, meta, tasks, mo.Budget(memory=10**9), meter=synthetic_meter).predicted_call_seconds \
        is None  # a stand-in meter runs no call to time
