"""`compile: auto`: eager where the run is too short to pay a compilation, compiled where it is measured faster."""
from __future__ import annotations

import pytest
import torch

import metaopt as mo
from metaopt import compile_choice
from metaopt import estimators as E
from metaopt.compile_choice import COMPILE_PAYS_AFTER, choose_compiled
from metaopt.compiled import Compiled
from metaopt.planning import plan
from test_budget_enforcement import _problem, synthetic_meter


def timer_where(compiled_per_step: float, eager_per_step: float, calls: list):
    """One call's seconds: per inner step per task, compiled or eager (the estimator says which)."""
    def timer(estimator, tasks, batching) -> float:
        n = tasks.query.x.shape[0] if isinstance(tasks, mo.Task) else len(tasks)
        steps = (tasks if isinstance(tasks, mo.Task) else tasks[0]).inner_steps
        compiled = getattr(estimator, "eager", None) is not None
        calls.append("compiled" if compiled else "eager")
        return (compiled_per_step if compiled else eager_per_step) * steps * n
    return timer


@pytest.fixture
def eager_call_seconds(monkeypatch):
    """A stand-in meter times nothing, so the eager plan's call seconds (its memory probes' timings) are set here."""
    seconds = {"value": 0.01}

    def planned(method, *args, **kwargs):
        found = plan(method, *args, **kwargs)
        return found if isinstance(method, Compiled) else found._replace(predicted_call_seconds=seconds["value"])
    monkeypatch.setattr(compile_choice, "plan", planned)
    return seconds


def _choose(meta_steps: int, timer):
    loop, meta, tasks = _problem(steps=10)
    compiled = Compiled(E.Full(), choose=True)
    return compiled, choose_compiled(compiled, loop, meta, tasks, mo.Budget(), meta_steps=meta_steps,
                                     meter=synthetic_meter, timer=timer)


def test_a_run_too_short_to_pay_a_compilation_stays_eager_without_compiling(eager_call_seconds):
    calls: list = []
    steps = int(COMPILE_PAYS_AFTER / eager_call_seconds["value"]) - 1
    compiled, found = _choose(steps, timer_where(0.001, 0.01, calls))
    assert not isinstance(found.estimator, Compiled) and "compiled" not in calls and compiled.first_calls == 0
    assert f"under the {COMPILE_PAYS_AFTER:.0f} s after which compiling may pay" in found.reason


@pytest.mark.parametrize("compiled_per_step, chosen", [(0.001, "compiled"), (0.009, "eager")])
def test_a_long_run_compiles_where_compiled_is_measured_faster_by_the_margin(eager_call_seconds, compiled_per_step,
                                                                             chosen):
    calls: list = []
    compiled, found = _choose(10**6, timer_where(compiled_per_step, 0.01, calls))
    assert isinstance(found.estimator, Compiled) == (chosen == "compiled")
    assert "compiled" in calls and "eager" in calls and found.reason.split("; ")[-1].startswith(chosen)
    if chosen == "compiled":  # 4 tasks x 10 steps x 0.001 s
        assert found.predicted_call_seconds == pytest.approx(0.04) and found.batching == "vmap"


def test_meta_train_under_compile_auto_runs_a_short_run_eager_and_never_compiles(tmp_path):
    """Real calls (no stand-ins): two meta-steps of the sinusoid cannot pay a compilation."""
    loop, meta, _ = _problem()
    compiled = Compiled(E.Full(), backend="aot_eager", choose=True)
    metrics = mo.meta_train(loop, meta, compiled, mo.Sinusoid(k_shot=5), meta_steps=2, meta_batch_size=4,
                            inner_steps=2, outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-3), eval_n_tasks=0,
                            progress=False)
    assert metrics["estimator_config"] == "full()" and compiled.first_calls == 0 and compiled.compiled_calls == 0
    assert "eager: the run's meta-gradients are predicted" in metrics["plan"]


def test_a_resumed_run_keeps_the_choice_its_first_session_made(tmp_path, monkeypatch):
    """The choice is timed, like the batching: a resumed session keeps it (re-timed, it could differ and the run
    would not resume bit for bit). Here a fresh choice would compile (the threshold set to 0 s); the resumed session
    keeps the first session's eager choice and compiles nothing."""
    loop, meta, _ = _problem()

    def run(steps: int, compiled: Compiled, path) -> dict:
        return mo.meta_train(loop, meta, compiled, mo.Sinusoid(k_shot=5), meta_steps=steps, meta_batch_size=4,
                             inner_steps=2, outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-3),
                             eval_n_tasks=0, progress=False, checkpoint_path=path)

    first = run(2, Compiled(E.Full(), backend="aot_eager", choose=True), tmp_path / "ckpt.pt")
    assert first["estimator_config"] == "full()"
    monkeypatch.setattr(compile_choice, "COMPILE_PAYS_AFTER", 0.0)
    resumed_wrapper = Compiled(E.Full(), backend="aot_eager", choose=True)
    resumed = run(3, resumed_wrapper, tmp_path / "ckpt.pt")
    assert resumed["meta_steps"] == 3 and resumed["estimator_config"] == "full()"
    assert "compile: auto's choice (eager) kept from the checkpoint" in resumed["plan"]
    assert resumed_wrapper.first_calls == 0
    fresh_wrapper = Compiled(E.Full(), backend="aot_eager", choose=True)
    run(1, fresh_wrapper, tmp_path / "fresh.pt")
    assert fresh_wrapper.first_calls >= 1  # without a checkpoint, the same settings compile to time it
