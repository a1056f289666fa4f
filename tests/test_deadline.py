"""A session's wall-clock limit, evaluation included (`metaopt.deadline`, `job_time_limit`): training stops where
the work after it keeps its predicted seconds, and a run whose work after training cannot fit is refused first."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import metaopt as mo
from metaopt.callbacks import Callback, Validation
from metaopt.deadline import RESERVE_MARGIN, Deadline, DeadlineExceeded
from metaopt_hydra.jobs import LAUNCHER_START_SECONDS, job_time_limit


class FakeClock:
    """Seconds that pass only when told (`now` is moved): a run's wall clock without wall-clock dependence."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TenSecondSteps(Callback):
    """Every meta-step takes 10 s of the fake clock (an entry after each, log_every=1)."""

    def __init__(self, clock: FakeClock):
        self.clock, self.entries = clock, 0

    def on_entry(self, state, entry, last) -> None:
        self.clock.now += 10.0
        self.entries += 1


def test_reservations_are_kept_with_their_margin_and_the_rest_is_for_training():
    clock = FakeClock()
    deadline = Deadline(100.0, clock=clock)
    deadline.reserve("the final evaluation", 20.0)
    deadline.reserve("protocol p", 4.0)
    assert deadline.reserved_seconds == pytest.approx(RESERVE_MARGIN * 24.0)
    clock.now += 30.0
    assert deadline.training_left() == pytest.approx(100.0 - 30.0 - 36.0)
    deadline.check()  # 34 s left: fine
    deadline.reserve("an untimed evaluation", None)  # not predicted: named, nothing kept
    assert deadline.unreserved == ["an untimed evaluation"] and deadline.reserved_seconds == pytest.approx(36.0)
    record = deadline.record()
    assert record["job_time_limit"] == 100.0 and record["job_seconds"] == pytest.approx(30.0)
    assert record["job_reserved"] == {"the final evaluation": 20.0, "protocol p": 4.0}
    assert record["job_unreserved"] == ["an untimed evaluation"]


def test_nothing_left_for_training_is_refused_naming_the_work_after_it():
    clock = FakeClock()
    deadline = Deadline(60.0, clock=clock)
    deadline.reserve("the final evaluation (600 tasks)", 35.0)  # x1.5 = 52.5 s
    clock.now += 8.0  # set-up and planning
    with pytest.raises(DeadlineExceeded, match=r"job time limit 60 s: 8 s .* the final evaluation \(600 tasks\) 35 s"):
        deadline.check()
    assert isinstance(DeadlineExceeded("x"), mo.BudgetExceeded)  # a budget refusal, as the planner's


def test_shares_split_what_is_left_for_training():
    clock = FakeClock()
    deadline = Deadline(100.0, clock=clock)
    deadline.reserve("the final evaluation", 20.0)  # 30 s kept: 70 s for training
    first = deadline.share(2)
    assert first.training_left() == pytest.approx(35.0) and first.reserved_seconds == 0.0
    clock.now += 35.0
    assert first.training_left() == pytest.approx(0.0) and deadline.share(1).training_left() == pytest.approx(35.0)
    with pytest.raises(ValueError, match="parts >= 1"):
        deadline.share(0)
    with pytest.raises(ValueError, match="seconds > 0"):
        Deadline(0.0)


def _parts():
    torch.manual_seed(0)
    model = mo.MLP(1, (8,), 1)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.01), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    return loop, meta, torch.optim.Adam(meta.parameters(), lr=1e-3)


def _train(deadline, callbacks=(), steps=50, **kwargs):
    loop, meta, opt = _parts()
    return mo.meta_train(loop, meta, mo.Full(), mo.Sinusoid(k_shot=5), outer_optimizer=opt, meta_steps=steps,
                         meta_batch_size=2, eval_n_tasks=8, eval_batch_size=8, progress=False, log_every=1,
                         callbacks=callbacks, deadline=deadline, **kwargs)


@pytest.mark.parametrize("reserved, steps", [(0.0, 10), (20.0, 7)])
def test_training_stops_where_the_reserved_seconds_are_left(reserved, steps):
    """Each meta-step takes 10 s of a fake clock; the limit is 100 s. The final evaluation's own prediction
    (milliseconds of real time) is reserved as well, so a stop at a whole step is exact: 100 s -> 10 steps; 20 s
    more reserved for work after training (x1.5 = 30 s) -> 7 steps."""
    clock = FakeClock()
    deadline = Deadline(100.0, clock=clock)
    if reserved:
        deadline.reserve("protocol p", reserved)
    metrics = _train(deadline, [TenSecondSteps(clock)])
    assert metrics["meta_steps"] == steps and metrics["stopped_at_time_limit"]
    assert metrics["stopped_by"] == "job_time_limit" and math.isfinite(metrics["meta_test_loss"])
    assert "the final evaluation (8 tasks)" in metrics["job_reserved"]
    assert metrics["job_time_limit"] == 100.0
    assert metrics["job_seconds"] == pytest.approx(10.0 * steps) and metrics["job_after_training_seconds"] == 0.0


def test_time_limit_stops_first_where_it_is_shorter_and_says_so():
    metrics = _train(Deadline(3600.0), time_limit=1e-9)
    assert metrics["meta_steps"] == 0 and metrics["stopped_by"] == "time_limit"
    metrics = _train(None, steps=3)
    assert metrics["meta_steps"] == 3 and metrics["stopped_by"] is None and "job_time_limit" not in metrics


def test_a_run_whose_evaluation_cannot_fit_is_refused_before_any_meta_step(tmp_path):
    clock = FakeClock()
    deadline = Deadline(100.0, clock=clock)
    deadline.reserve("protocol p", 70.0)  # x1.5 = 105 s > 100 s
    steps = TenSecondSteps(clock)
    with pytest.raises(DeadlineExceeded, match="protocol p 70 s"):
        _train(deadline, [steps], checkpoint_path=tmp_path / "ckpt.pt")
    assert steps.entries == 0 and not (tmp_path / "ckpt.pt").exists()


def test_validation_at_the_end_is_reserved_where_it_predicts_and_named_where_it_cannot():
    class Predicting:
        def __call__(self, meta):
            return {"val_loss": 1.0}

        def predicted_seconds(self, meta):
            return 4.0

    deadline = Deadline(3600.0)
    metrics = _train(deadline, [Validation(Predicting())], steps=2)
    assert metrics["job_reserved"]["Validation at the end"] == 4.0 and metrics["val_loss"] == 1.0
    metrics = _train(Deadline(3600.0), [Validation(lambda meta: {"val_loss": 2.0})], steps=2)
    assert metrics["job_unreserved"] == ["Validation at the end"]


def test_a_periodic_validation_starts_only_where_it_fits_beside_its_step():
    """Steps take no time of the fake clock; a validation after every second step takes 30 s and predicts them.
    Limit 100 s, the validation at the end kept x1.5 (45 s): 55 s for training. Steps 1 and 2 (its validation: 30
    s), step 3; step 4 is not started, as its validation (30 s) would eat 5 s of what is kept (it was started
    before: the check counted the step alone). The validation at the end then runs in what was kept."""
    clock = FakeClock()

    class ThirtySeconds:
        calls = 0

        def __call__(self, meta):
            clock.now += 30.0
            ThirtySeconds.calls += 1
            return {"val_loss": 1.0}

        def predicted_seconds(self, meta):
            return 30.0

    metrics = _train(Deadline(100.0, clock=clock), [Validation(ThirtySeconds(), every=2)], steps=10)
    assert metrics["meta_steps"] == 3 and metrics["stopped_by"] == "job_time_limit"
    assert ThirtySeconds.calls == 2 and metrics["job_seconds"] == pytest.approx(60.0)  # step 2's, the end's


def test_a_processs_first_job_starts_with_the_process_and_a_later_one_when_it_starts(monkeypatch):
    from metaopt_hydra import jobs
    monkeypatch.setattr(jobs, "_jobs_started", 0)
    monkeypatch.setattr(jobs, "process_age", lambda: 100.0)
    monkeypatch.setattr(jobs.time, "perf_counter", lambda: 1000.0)
    assert jobs.job_started() == 900.0  # the interpreter, imports and composition count for the first job
    assert jobs.job_started() == 1000.0  # a sweep's next job in the same process: not the jobs before it


def test_a_sweeps_jobs_run_in_one_process_each_have_their_own_clock(tmp_path):
    """Hydra's basic launcher runs a sweep's jobs in turn in one process: the second job's clock starts with it
    (it had counted the first job's seconds, and a tight limit refused or shortened every later job)."""
    import json
    import os
    import subprocess
    import sys
    from test_experiments import ROOT
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "experiments/train.py", "-m", "debug=tiny", "job_time_limit=10m",
                             "seed=0,1", f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = (json.loads((tmp_path / job / "metrics.json").read_text()) for job in ("0", "1"))
    assert second["job_seconds"] < first["job_seconds"]  # the first's include the interpreter and the imports


def test_job_time_limit_auto_is_a_submitit_launchers_timeout_less_its_start():
    auto = OmegaConf.create({"job_time_limit": "auto"})
    slurm = OmegaConf.create({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                              "timeout_min": 240})
    assert job_time_limit(auto, slurm) == 240 * 60 - LAUNCHER_START_SECONDS
    short = OmegaConf.merge(slurm, {"timeout_min": 2})
    assert job_time_limit(auto, short) == 120 * 0.75  # a short job keeps a quarter for its start
    joblib = OmegaConf.create({"_target_": "hydra_plugins.hydra_joblib_launcher.JoblibLauncher", "n_jobs": 2})
    assert job_time_limit(auto, joblib) is None and job_time_limit(auto) is None
    assert job_time_limit(OmegaConf.create({"job_time_limit": "55m"}), slurm) == 3300.0
    assert job_time_limit(OmegaConf.create({"job_time_limit": None}), slurm) is None
    with pytest.raises(ValueError, match="cannot parse 'soon'"):
        job_time_limit(OmegaConf.create({"job_time_limit": "soon"}))


def test_a_resumed_run_with_nothing_left_to_train_is_not_refused(tmp_path):
    _train(None, steps=2, checkpoint_path=tmp_path / "ckpt.pt")
    clock = FakeClock()
    deadline = Deadline(100.0, clock=clock)
    deadline.reserve("protocol p", 70.0)  # x1.5 > 100 s: a run with training to do is refused
    metrics = _train(deadline, steps=2, checkpoint_path=tmp_path / "ckpt.pt")
    assert metrics["meta_steps"] == 2 and math.isfinite(metrics["meta_test_loss"])


@given(limit=st.floats(1.0, 1e5), elapsed=st.floats(0.0, 1e5),
       predicted=st.lists(st.one_of(st.none(), st.floats(0.0, 1e4)), max_size=5),
       kept=st.floats(0.0, 100.0), parts=st.integers(1, 6))
@settings(max_examples=200, deadline=None)
def test_what_is_left_for_training_is_the_limit_less_the_clock_and_what_is_kept(limit, elapsed, predicted, kept,
                                                                               parts):
    clock = FakeClock()
    deadline = Deadline(limit, clock=clock)
    for i, seconds in enumerate(predicted):
        deadline.reserve(f"work {i}", seconds)
    deadline.keep("the end", kept)
    clock.now += elapsed
    reserved = RESERVE_MARGIN * sum(p for p in predicted if p is not None) + kept
    left = limit - elapsed - reserved
    assert deadline.training_left() == pytest.approx(left, abs=1e-6)
    assert deadline.unreserved == [f"work {i}" for i, p in enumerate(predicted) if p is None]
    if deadline.training_left() > 0:  # (its own sign: the clock's float rounding decides at 0)
        deadline.check()
        assert deadline.share(parts).training_left() == pytest.approx(left / parts, abs=1e-6)
    else:
        with pytest.raises(DeadlineExceeded):
            deadline.check()
        assert deadline.share(parts).training_left() <= 1e-6  # nothing to share
