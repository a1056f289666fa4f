"""The budget fault matrix: every row ends in a clear error or documented behaviour, and nothing is lost.

Planning logic is tested with a deterministic synthetic meter (how big each estimator
"is"), time and memory guards with an injected clock and memory probe: no test
depends on the machine's speed or allocator. The real measurement is checked by
experiments/bench_memory.py and experiments/bench_budget.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import metaopt as mo
from metaopt import estimators as E
from metaopt.batching import unstack_tasks
from metaopt.checkpoint import load_checkpoint
from metaopt.compiled import Compiled
from metaopt.planning import choose, plan
from metaopt.prediction import TIMED_STEPS, Predictor
from problems import tiny_model, tiny_tasks

FIXED, GRAPH_STEP, BOUNDARY = 500, 1000, 2000


def synthetic_meter(estimator, tasks, batching) -> int:
    """Bytes as if each kept graph step cost 1000, each checkpoint boundary 2000, vmapped tasks 20% each."""
    steps = (tasks if isinstance(tasks, mo.Task) else tasks[0]).inner_steps
    n = tasks.query.x.shape[0] if isinstance(tasks, mo.Task) else len(tasks)
    if isinstance(estimator, E.Checkpoint):
        size = estimator.segment_for(steps)
        one = FIXED + GRAPH_STEP * min(size, steps) + BOUNDARY * (math.ceil(steps / size) - 1)
    elif isinstance(estimator, E.Truncated):
        one = FIXED + GRAPH_STEP * min(estimator.k, steps)
    elif isinstance(estimator, (E.Full,)):
        one = FIXED + GRAPH_STEP * steps
    elif isinstance(estimator, E.FirstOrder):
        one = FIXED + 50 * steps
    else:
        one = FIXED + 10 * steps
    return int(one * (1 + 0.2 * (n - 1)))


def _problem(kind: str = "init", hidden: int = 6, n_tasks: int = 4, steps: int = 16):
    model = tiny_model(hidden)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
    meta = {"init": lambda: mo.meta_params(mo.Init(model)),
            "init+lrs": lambda: mo.meta_params(mo.Init(model), mo.LearningRates(model, granularity="element"))}[kind]()
    return loop, meta, tiny_tasks(n_tasks, steps)


def test_plan_keeps_the_whole_batch_in_one_vmap_when_it_fits():
    loop, meta, tasks = _problem()
    found = plan(E.Full(), loop, meta, tasks, mo.Budget(memory=10**6), meter=synthetic_meter)
    assert (found.batching, found.chunk_size) == ("stacked", 4)  # one graph on the task axis
    assert found.predicted_peak_bytes == synthetic_meter(E.Full(), tasks, "stacked")


def timer_where(loop_factor: float, calls: list | None = None):
    """A stand-in timer: a batched call (stacked or vmapped) takes 1 s, the same tasks one at a time `loop_factor` s."""
    def timer(estimator, tasks, batching) -> float:
        if calls is not None:
            calls.append(batching)
        return 1.0 if batching != "loop" else loop_factor
    return timer


@pytest.mark.parametrize("loop_factor,expected", [(0.5, "loop"), (0.9, "stacked"), (2.0, "stacked")])
def test_plan_runs_tasks_one_at_a_time_where_that_is_measured_clearly_faster(loop_factor, expected):
    loop, meta, tasks = _problem()
    found = plan(E.Full(), loop, meta, tasks, mo.Budget(memory=10**6), meter=synthetic_meter,
                 timer=timer_where(loop_factor))
    assert found.batching == expected and found.chunk_size == (1 if expected == "loop" else 4)
    assert f"1 s stacked vs {loop_factor:.3g} s one task at a time" in found.reason
    # The prediction is the chosen batching's: one task's graph at a time under the loop.
    one_graph = tasks if expected == "stacked" else unstack_tasks(tasks)[:1]
    assert found.predicted_peak_bytes == synthetic_meter(E.Full(), one_graph, expected)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_an_explicit_batching_or_a_compiled_estimator_is_planned_by_memory_alone(batching):
    loop, meta, tasks = _problem()
    calls: list = []
    found = plan(E.Full(), loop, meta, tasks, mo.Budget(), batching=batching, meter=synthetic_meter,
                 timer=timer_where(0.1, calls))
    compiled = plan(Compiled(E.Full()), loop, meta, tasks, mo.Budget(), meter=synthetic_meter,
                    timer=timer_where(0.1, calls))
    # Compiled, "auto" vmaps: the vmapped trace is the faster compiled chunk (`Compiled.stacked_slower`).
    assert found.batching == batching and (compiled.batching, compiled.chunk_size) == ("vmap", 4)
    assert calls == [] and "one task at a time" not in compiled.reason


def test_predictor_times_each_batching_on_the_tasks_cut_to_at_most_16_steps():
    loop, meta, tasks = _problem(steps=20)
    (vmapped, looped), steps = Predictor(loop, meta, tasks).seconds(E.Full(), 4, (4, 1))
    assert steps == TIMED_STEPS == 16 and 0 < vmapped < math.inf and 0 < looped < math.inf
    # A stand-in meter runs nothing, so there is nothing to time without a stand-in timer.
    assert not Predictor(loop, meta, tasks, meter=synthetic_meter).can_time
    assert Predictor(loop, meta, tasks, meter=synthetic_meter, timer=timer_where(1.0)).can_time


def test_meta_train_runs_the_plan_the_timer_chose(tmp_path):
    loop, meta, _ = _problem()
    outer = torch.optim.Adam(meta.parameters(), lr=1e-3)
    metrics = mo.meta_train(loop, meta, E.Full(), mo.Sinusoid(k_shot=5), outer_optimizer=outer, meta_steps=2,
                            meta_batch_size=4, inner_steps=2, eval_n_tasks=0, progress=False,
                            meter=synthetic_meter, timer=timer_where(0.5))
    assert (metrics["batching"], metrics["chunk_size"]) == ("loop", 1)
    assert "one task at a time is faster" in metrics["plan"]


def test_plan_splits_the_batch_into_chunks_that_fit():
    loop, meta, tasks = _problem()
    one = FIXED + GRAPH_STEP * 16
    found = plan(E.Full(), loop, meta, tasks, mo.Budget(memory=int(one * 1.25 / 0.9)), meter=synthetic_meter)
    assert (found.batching, found.chunk_size) == ("stacked", 2)
    assert "stacked chunks of 2 fit" in found.reason and "90% of the budget" in found.reason
    # Without the headroom's 10% a chunk of 2 (1.2 x one task) no longer fits: task by task.
    found = plan(E.Full(), loop, meta, tasks, mo.Budget(memory=int(one * 1.25)), meter=synthetic_meter)
    assert (found.batching, found.chunk_size) == ("loop", 1)
    # A compiled estimator computes vmapped chunks only: task by task is then a vmap of one task at a time.
    compiled = plan(Compiled(E.Full()), loop, meta, tasks, mo.Budget(memory=int(one * 1.25)), meter=synthetic_meter)
    assert (compiled.batching, compiled.chunk_size) == ("vmap", 1)
    single = plan(Compiled(E.Full()), loop, meta, tiny_tasks(1, 16), mo.Budget(), meter=synthetic_meter)
    assert (single.batching, single.chunk_size) == ("vmap", 1)
    # The chunked call gives the same meta-gradient as one big vmap.
    chunked = E.Full()(loop, meta, tasks, chunk_size=2)
    whole = E.Full()(loop, meta, tasks)
    for k, g in whole.grads.items():
        torch.testing.assert_close(chunked.grads[k], g, rtol=1e-10, atol=1e-12)
    assert chunked.stats["chunk_size"] == 2


def test_budget_too_small_for_every_estimator():
    loop, meta, tasks = _problem()
    with pytest.raises(mo.BudgetExceeded, match=r"no estimator fits the memory budget 100 B at T=16 "
                                                r"\(per task: full\(\) predicts 16.5 kB"):
        choose(loop, meta, tasks, mo.Budget(memory=100), meter=synthetic_meter)
    with pytest.raises(mo.BudgetExceeded, match=r"full\(\) at T=16 predicts 16500 bytes .* > memory budget 100 bytes"
                                                r".*no estimator fits: raise the budget or lower inner_steps"):
        plan(E.Full(), loop, meta, tasks, mo.Budget(memory=100), meter=synthetic_meter)


def test_error_names_the_configurations_that_fit():
    loop, meta, tasks = _problem()
    with pytest.raises(mo.BudgetExceeded, match=r"full\(\) at T=16 predicts 16500 bytes \(16.5 kB\) for one task > "
                                                r"memory budget 12000 bytes.*checkpoint\(segment=\d+\) fits: "):
        plan(E.Full(), loop, meta, tasks, mo.Budget(memory=12000), meter=synthetic_meter)


def test_auto_picks_checkpoint_when_full_does_not_fit_and_stays_exact():
    loop, meta, tasks = _problem()
    auto = mo.Auto(meter=synthetic_meter)
    budget = mo.Budget(memory=14000)
    chosen = choose(loop, meta, tasks, budget, meter=synthetic_meter)
    assert isinstance(chosen.estimator, E.Checkpoint)
    assert "full() predicts 16.5 kB > 12.6 kB = 90% of the budget 14 kB" in chosen.reason
    result = auto(loop, meta, tasks, budget, memory_probe=lambda: 0)  # synthetic bytes: no real guard
    assert result.stats["estimator_chosen"] == "checkpoint"
    reference = E.Full()(loop, meta, tasks)
    for k, g in reference.grads.items():
        torch.testing.assert_close(result.grads[k], g, rtol=1e-6, atol=1e-10)


def test_auto_falls_back_to_the_largest_truncation_that_fits():
    loop, meta, tasks = _problem("init+lrs", hidden=16)  # > 256 meta-scalars: no exact forward mode
    chosen = choose(loop, meta, tasks, mo.Budget(memory=FIXED + GRAPH_STEP * 5), meter=synthetic_meter)
    assert describe_of(chosen) == "truncated(k=4)"
    assert "first approximate estimator that fits" in chosen.reason


def describe_of(found) -> str:
    from metaopt.planning import describe
    return describe(found.estimator)


def test_auto_never_offers_a_truncation_that_zeroes_an_initialization():
    loop, meta, tasks = _problem("init")
    chosen = choose(loop, meta, tasks, mo.Budget(memory=FIXED + GRAPH_STEP * 5), meter=synthetic_meter)
    assert not isinstance(chosen.estimator, E.Truncated)


class FakeClock:
    """Advances one second every time it is read."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("estimator", [E.Full(), E.Checkpoint(segment=2), E.EvolutionStrategies(population=2)],
                         ids=str)
def test_time_budget_raise_names_the_step(estimator):
    loop, meta, tasks = _problem(n_tasks=2, steps=6)
    with pytest.raises(mo.BudgetExceeded, match=r"task 0 ran 3 s, past its time budget of 2.5 s at inner step 3"):
        estimator(loop, meta, tasks, mo.Budget(time=2.5), batching="loop", clock=FakeClock())


def test_time_budget_truncate_recomputes_on_the_steps_that_fitted():
    loop, meta, tasks = _problem(n_tasks=2, steps=6)
    result = E.Full()(loop, meta, tasks, mo.Budget(time=2.5, on_exceed="truncate"), batching="loop",
                      clock=FakeClock())
    assert result.stats["tasks_truncated"] == 2
    shorter = tasks._replace(support=tasks.support[:2])
    expected = E.Full()(loop, meta, shorter)
    for k, g in expected.grads.items():
        torch.testing.assert_close(result.grads[k], g, rtol=1e-10, atol=1e-12)


def test_time_budget_skip_leaves_tasks_out_and_says_so():
    loop, meta, tasks = _problem(n_tasks=2, steps=6)
    result = E.Full()(loop, meta, tasks, mo.Budget(time=2.5, on_exceed="skip"), batching="loop", clock=FakeClock())
    assert result.stats["tasks_skipped"] == 2 and math.isnan(result.outer_loss.item())
    assert all(torch.count_nonzero(g) == 0 for g in result.grads.values())


@pytest.mark.parametrize("batching", ["stacked", "vmap"])
def test_time_budget_of_a_batched_graph_applies_to_the_whole_chunk(batching):
    loop, meta, tasks = _problem(n_tasks=3, steps=6)
    result = E.Full()(loop, meta, tasks, mo.Budget(time=2.5, on_exceed="truncate"), clock=FakeClock(),
                      batching=batching)
    assert result.stats["batching"] == batching and result.stats["tasks_truncated"] == 3


def test_guard_catches_a_wrong_prediction():
    """The planner believes the task is tiny; the memory probe shows it growing 1 MB per step."""
    loop, meta, tasks = _problem(n_tasks=2, steps=6)
    budget = mo.Budget(memory="2.5MB")
    assert plan(E.Full(), loop, meta, tasks, budget, meter=lambda *a: 1000).predicted_peak_bytes == 1000
    usage = iter(range(0, 10**9, 10**6))
    with pytest.raises(mo.BudgetExceeded, match=r"uses 3 MB, past its memory budget of 2.5 MB \(the prediction "
                                                r"was too low\) at inner step 3"):
        E.Full()(loop, meta, tasks, budget, batching="loop", memory_probe=lambda: next(usage))


class PoisonedSinusoid(mo.Sinusoid):
    """Task 1 of every batch has a NaN target in its support set."""

    def sample(self, n_tasks, inner_steps, generator):
        task = super().sample(n_tasks, inner_steps, generator)
        y = task.support[0].y.clone()
        y[1, 0] = float("nan")
        return mo.Task.repeat(mo.Batch(task.support[0].x, y), task.query, inner_steps)


def _train(tasks, tmp_path, **kwargs):
    torch.manual_seed(0)
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    return mo.meta_train(loop, meta, E.Full(), tasks, outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-3),
                         meta_steps=3, meta_batch_size=3, inner_steps=2, eval_n_tasks=6, progress=False,
                         checkpoint_path=tmp_path / "ckpt.pt", meter=synthetic_meter, **kwargs)


def test_nan_inner_loss_names_meta_step_task_and_inner_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"meta-step 0, task 1: inner step 1: inner loss is nan"):
        _train(PoisonedSinusoid(k_shot=5), tmp_path)
    assert load_checkpoint(tmp_path / "ckpt.pt")["meta_step"] == 0  # readable, nothing lost


def test_nan_tasks_skipped_and_counted_under_on_nan_skip(tmp_path):
    metrics = _train(PoisonedSinusoid(k_shot=5), tmp_path, on_nan="skip", eval_tasks=mo.Sinusoid(k_shot=5))
    assert metrics["tasks_nan_skipped"] == 3 and math.isfinite(metrics["meta_train_loss"])


def test_meta_train_counts_skipped_tasks_and_keeps_its_checkpoint(tmp_path):
    metrics = _train(mo.Sinusoid(k_shot=5), tmp_path, budget=mo.Budget(time=1.5, on_exceed="skip"),
                     clock=FakeClock(), batching="loop")
    assert metrics["tasks_skipped"] == 9 and metrics["meta_steps"] == 3
    assert load_checkpoint(tmp_path / "ckpt.pt")["counts"]["tasks_skipped"] == 9


def test_meta_train_refuses_an_impossible_budget_before_training(tmp_path):
    with pytest.raises(mo.BudgetExceeded, match="predicts"):
        _train(mo.Sinusoid(k_shot=5), tmp_path, budget=mo.Budget(memory=100))
    assert not (tmp_path / "ckpt.pt").exists()


def test_meta_train_records_plan_and_memory(tmp_path):
    metrics = _train(mo.Sinusoid(k_shot=5), tmp_path)
    assert metrics["estimator_chosen"] == "full" and metrics["predicted_peak_bytes"] > 0
    assert metrics["measured_peak_bytes"] >= 0 and metrics["memory_method"] in ("rss", "profiler", "cuda")


def test_a_diverged_task_is_not_hidden_from_the_mean():
    loop, meta, _ = _problem()
    tasks = PoisonedSinusoid(k_shot=5).sample(3, 2, torch.Generator().manual_seed(0))
    result = E.Full()(loop, meta, tasks)
    assert math.isnan(result.outer_loss.item()) and bool(result.task_used.all())
    assert math.isnan(result.task_losses[1].item()) and math.isfinite(result.task_losses[0].item())


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_uneven_chunks_give_the_mean_over_tasks(chunk):
    """Chunks of different sizes (5 tasks in chunks of 2, 2, 1 ...) weigh each task once: the mean of the
    task-by-task meta-gradients, computed here one task at a time."""
    loop, meta, tasks = _problem("init+lrs", n_tasks=5, steps=3)
    per_task = [E.Full()(loop, meta, [task]).grads for task in mo.unstack_tasks(tasks)]
    result = E.Full()(loop, meta, tasks, chunk_size=chunk)
    for k in per_task[0]:
        torch.testing.assert_close(result.grads[k], sum(g[k] for g in per_task) / 5, rtol=1e-10, atol=1e-12)
    assert result.task_used.all() and result.task_losses.shape == (5,)


def test_without_a_memory_budget_the_plan_still_fits_the_machine(monkeypatch):
    """No memory budget is no licence to be killed (an out-of-memory kill leaves no record): the plan fits the
    memory available on the device now, in chunks, saying so; what cannot fit there is refused before any work;
    where the available memory is unknown, nothing bounds the plan."""
    loop, meta, tasks = _problem()
    one = FIXED + GRAPH_STEP * 16
    monkeypatch.setattr("metaopt.budget.available_bytes", lambda device: int(one * 1.25 / 0.9))
    found = plan(E.Full(), loop, meta, tasks, mo.Budget(), meter=synthetic_meter)
    assert (found.batching, found.chunk_size) == ("stacked", 2)
    assert "no memory budget was given" in found.reason and "available on cpu" in found.reason
    monkeypatch.setattr("metaopt.budget.available_bytes", lambda device: one // 2)
    with pytest.raises(mo.BudgetExceeded, match="no memory budget was given.*nothing fits in it"):
        plan(E.Full(), loop, meta, tasks, mo.Budget(), meter=synthetic_meter)
    monkeypatch.setattr("metaopt.budget.available_bytes", lambda device: None)
    assert plan(E.Full(), loop, meta, tasks, mo.Budget(), meter=synthetic_meter).chunk_size == 4


def test_evaluation_without_a_memory_budget_runs_in_pieces_that_fit_the_machine(monkeypatch):
    """Meta-test batches are sized to the available memory when no budget is given (1000 bytes per task, 10 kB
    available: 9 tasks at once under the 10% headroom)."""
    import contextlib

    from metaopt import evaluation
    from metaopt.memory import PeakMemory

    sizes = []
    monkeypatch.setattr(evaluation, "_adapted_scores", lambda loop, meta, part, *rest: sizes.append(len(part.query.y)))

    @contextlib.contextmanager
    def measured(device, method="auto"):
        peak = PeakMemory()
        yield peak
        peak.peak_bytes = 1000 * sizes[-1]

    monkeypatch.setattr(evaluation, "measure_peak_memory", measured)
    loop, meta, _ = _problem()
    tasks = mo.Sinusoid(k_shot=5)
    monkeypatch.setattr("metaopt.budget.available_bytes", lambda device: 10_000)

    def piece() -> int:
        return evaluation.plan_evaluation(loop, meta, tasks, mo.Budget(), inner_steps=2, batch_size=20,
                                          batching="vmap", timer=lambda form, n: 1.0).piece

    assert piece() == 9
    monkeypatch.setattr("metaopt.budget.available_bytes", lambda device: None)
    assert piece() == 20


def test_available_memory_is_read_from_the_machine():
    from metaopt.memory import available_bytes

    room = available_bytes("cpu")
    if room is None:
        pytest.skip("no /proc/meminfo or cgroup limit here")
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    assert 0 < room <= total
