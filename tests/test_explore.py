"""The explorer's Optuna side and its app: search spaces, a killed explorer resuming its study, the outputs."""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys

import pytest
from db import ESTIMATORS
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_experiments import ROOT
from test_explore_engine import FakeClock, FakeRunner

from metaopt.explore import Explorer
from metaopt_hydra.explore.runner import estimator_node
from metaopt_hydra.explore.search import SearchSpace
from metaopt_hydra.explore.study import ExplorerStudy, open_storage

SPACE = {"x": {"dist": "uniform", "low": 0.0, "high": 1.0},
         "cost": {"dist": "categorical", "choices": [100, 300, 600, 2000]},
         "lr": {"dist": "loguniform", "low": 1e-3, "high": 1.0},
         "steps": {"dist": "int", "low": 1, "high": 50, "log": True},
         "width": {"dist": "fixed", "value": [40, 40]}}


def test_search_space_draws_perturbs_and_refuses_bad_entries():
    space = SearchSpace(OmegaConf.create(SPACE))
    assert set(space.distributions) == {"x", "cost", "lr", "steps"} and space.fixed == {"width": [40, 40]}
    assert space.overrides({"x": 0.5})[:1] == ["width=[40,40]"]
    rng = random.Random(0)
    params = {"x": 0.5, "cost": 300, "lr": 0.01, "steps": 10}
    for _ in range(50):
        child = space.perturb(params, rng)
        assert child != params
        assert 0 <= child["x"] <= 1 and child["cost"] in (100, 300, 600, 2000) and 1e-3 <= child["lr"] <= 1
        assert 1 <= child["steps"] <= 50 and isinstance(child["steps"], int)
    with pytest.raises(ValueError, match="'bad': dist must be one of"):
        SearchSpace({"bad": {"dist": "normal"}})
    with pytest.raises(ValueError, match="'lr': need 0 < low"):
        SearchSpace({"lr": {"dist": "loguniform", "low": 0, "high": 1}})


def _study(tmp_path, seed=0):
    space = SearchSpace(OmegaConf.create({k: v for k, v in SPACE.items() if k in ("x", "cost")}))
    return ExplorerStudy(open_storage(None, tmp_path), "s", space, worker="0", memory_share=333, seed=seed)


def test_a_killed_explorer_resumes_its_study(tmp_path):
    clock = FakeClock()
    first = _study(tmp_path)
    explorer = Explorer(FakeRunner(clock), first, memory=1000, time_budget=40, max_parallel=3, rung_steps=10, eta=2,
                        rungs=3, clock=clock, sleep=clock.sleep, perturb=lambda p, r: dict(p))
    # "kill" it mid-run: step its loop by hand, then drop it with trials still running
    explorer.started = clock()
    for _ in range(12):
        explorer._fill()
        explorer._admit()
        explorer._poll()
        clock.sleep(0)
    assert explorer.running, "the kill must leave trials running"
    finished_before = {r.trial for r in first.records()}
    second = _study(tmp_path)
    assert second.fail_stale() >= len(explorer.running)
    previous = second.records()
    assert {r.trial for r in previous} == finished_before and previous
    resumed = Explorer(FakeRunner(clock), second, memory=1000, time_budget=40, max_parallel=3, rung_steps=10, eta=2,
                       rungs=3, clock=clock, sleep=clock.sleep, previous=previous)
    records = resumed.run()
    numbers = [r.trial for r in records]
    assert len(numbers) == len(set(numbers)) and max(numbers) > max(finished_before)  # new trials continue the study
    assert all(r.status in ("complete", "pruned", "infeasible", "failed") for r in records)


def test_contract_explore_end_to_end(tmp_path):
    """A short search: pareto.csv, events.jsonl, best/*.yaml that train.py runs."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "explore"
    # 45 s is 30 s of search (15 s are kept for the report); rungs of 10 meta-steps: on a loaded machine
    # (the suite beside a training run) 35 s with rungs of 20 left no trial at its first rung, so no front.
    result = subprocess.run([sys.executable, "experiments/explore.py", "search=sinusoid_maml", "explore.time=45s",
                             "explore.memory=1GB", "explore.max_parallel=2", "explore.rung_steps=10",
                             "explore.rungs=2", f"hydra.run.dir={run}"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:8] == ["trial", "status", "estimator_chosen", "predicted_peak_bytes",
                                 "measured_peak_bytes", "train_seconds", "val_loss", "pareto"]
    assert {"estimator", "inner_steps", "inner_optim.lr", "meta_batch_size"} <= set(rows[0])
    assert {r["status"] for r in rows} <= {"complete", "pruned", "infeasible", "failed"}
    front = [r for r in rows if r["pareto"] == "1"]
    assert front and all(r["val_loss"] for r in front)
    # Admission's seconds per meta-step (the memory probes, timed) beside the measured ones.
    assert all(float(r["predicted_step_seconds"]) > 0 and float(r["measured_step_seconds"]) > 0 for r in front)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events and all({"time", "trial", "event", "running_predicted_bytes"} <= set(e) for e in events)
    assert all(e["running_predicted_bytes"] <= 10**9 for e in events)
    best = sorted((run / "best").glob("*.yaml"))
    assert len(best) == len(front)
    # A trial runs the batching it was priced with (the planner's choice, not "auto" again).
    assert all(OmegaConf.load(b).batching in ("stacked", "vmap", "loop") for b in best)
    again = subprocess.run([sys.executable, "experiments/train.py", "--config-dir", str(run / "best"),
                            "--config-name", best[0].stem, f"hydra.run.dir={tmp_path / 'd2'}", "eval.n_tasks=20"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "d2" / "metrics.json").read_text())["status"] == "ok"
    assert (run / "pareto.png").exists() and (run / "front.md").exists()


def test_each_trial_is_one_logged_run_grouped_by_study_and_resumed(monkeypatch, tmp_path):
    """explore.logger=wandb: a trial's rungs go to one wandb run (group: the study); a resumed trial keeps its id."""
    import multiprocessing
    import sys

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from metaopt_hydra.explore.worker import trial_worker
    from test_runs import FakeWandb
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=tiny", "logger=wandb", "eval.val_n_tasks=4"])
    parent, child = multiprocessing.Pipe()
    parent.send("continue")  # the explorer's go-ahead after the first rung, queued before it is asked for
    trial_worker(OmegaConf.to_yaml(cfg), str(tmp_path / "trial"), [2, 4], "my_study", conn=child)
    messages = [parent.recv() for _ in range(3)]
    assert [m[0] for m in messages] == ["rung", "rung", "done"]
    assert all(m[1].validation_seconds > 0 for m in messages[:2])  # each rung's own validation, measured
    assert len(fake.inits) == 1 and fake.inits[0]["group"] == "my_study" and fake.finished == [0]
    rung_entries = [(step, m) for step, m in fake.logged if "rung" in m]
    assert [(step, m["rung"]) for step, m in rung_entries] == [(2, 0), (4, 1)] and "val_loss" in rung_entries[0][1]
    trial_worker(OmegaConf.to_yaml(cfg), str(tmp_path / "trial"), [4], "my_study", conn=child)  # resumed
    assert fake.inits[1]["id"] == fake.inits[0]["id"] and fake.finished == [0, 0]


def test_report_of_a_search_where_no_trial_reached_a_rung(tmp_path):
    """A deadline before any first rung still gives every output (a plot that says so), not a crash."""
    from metaopt.explore import TrialRecord
    from metaopt_hydra.explore.report import write_report
    records = [TrialRecord(0, {"inner_steps": 3}, status="pruned", error="stopped at the deadline before its first rung"),
               TrialRecord(1, {"inner_steps": 1}, status="infeasible", error="nothing fits")]
    write_report(records, tmp_path, ["inner_steps"], {0: None, 1: None})
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "pareto.csv").exists()


@pytest.mark.parametrize("info", ESTIMATORS, ids=str)
def test_a_priced_estimator_is_written_back_as_a_config_that_builds_it(info):
    """A trial runs the estimator it was priced with, from its written config: the node builds an estimator of
    the same class with the same state (`es` keeps arguments it does not take, PES's k: they must not be written)."""
    estimator = info.make(3)
    built = instantiate(OmegaConf.create(estimator_node(estimator)))
    assert type(built) is type(estimator) and vars(built) == vars(estimator)


def test_the_time_summary_states_the_ratios_and_what_the_deadline_rule_did():
    from metaopt.explore import Rung, TrialRecord
    from metaopt_hydra.explore.report import time_summary

    def ran(trial: int, predicted: float | None, measured: float, error: str = "") -> TrialRecord:
        return TrialRecord(trial, {}, status="complete", rungs=[Rung(0, 10, 1.0, 10 * measured, 1)], error=error,
                           predicted_step_seconds=predicted)
    records = [ran(0, 1.0, 1.0), ran(1, 1.0, 2.0), ran(2, 1.0, 4.0, "stopped at rung 0: its next rung (30 ..."),
               ran(3, None, 9.0),
               TrialRecord(4, {}, status="pruned", error="stopped at the deadline before its first rung"),
               TrialRecord(5, {}, status="pruned", error="not started: its first rung was predicted 9 s away")]
    line = time_summary(records)
    assert "median 2.00 (1.00-4.00) over 3 trial(s)" in line and "1 of 3 within 1.25x" in line
    assert "first rungs cut by the deadline: 1" in line and "first rung predicted past it: 1" in line
    assert "stopped at a rung, the next predicted past it: 1" in line
    assert time_summary(records[3:]).startswith("seconds per meta-step: no trial with a prediction ran")


def test_a_worker_applies_its_trials_allocator_and_is_reused_only_for_the_same_one(monkeypatch, tmp_path):
    """`allocator: keep` (the Omniglot configs') made trials 2x faster per step under train.py, but explorer workers
    never applied it: a trial then ran, and was timed, slower than its config runs alone."""
    import multiprocessing

    from metaopt_hydra.explore import worker
    from metaopt_hydra.explore.runner import ProcessRunner

    applied: list[str] = []
    monkeypatch.setattr(worker, "set_allocator", applied.append)
    parent, child = multiprocessing.Pipe()
    parent.send("exit")
    worker.worker_main(child, 1, "keep")
    assert applied == ["keep"]

    class Alive:
        def __init__(self, alive: bool = True):
            self.alive = alive

        def is_alive(self) -> bool:
            return self.alive

    runner = ProcessRunner(lambda params: OmegaConf.create({}), tmp_path, threads=1)
    dead, system, keep = (Alive(False), "c0", "system"), (Alive(), "c1", "system"), (Alive(), "c2", "keep")
    runner.idle = [dead, system, keep]
    assert runner._worker("keep") == (keep[0], "c2") and runner._worker("system") == (system[0], "c1")
    assert runner.idle == []  # the dead one dropped, the others taken


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "search").glob("*.yaml")))
def test_every_search_space_composes_with_its_base(name):
    """Each shipped search space's base and drawn keys are keys of the config (a typo would fail every trial)."""
    from hydra import compose, initialize_config_dir

    spec = OmegaConf.load(ROOT / "conf" / "search" / f"{name}.yaml")
    base = [str(o).replace("${data.root}", "/nowhere") for o in OmegaConf.to_container(spec.base, resolve=False)]
    space = SearchSpace(spec.params)
    drawn = {k: (d.choices[-1] if hasattr(d, "choices") else d.high) for k, d in space.distributions.items()}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=base + space.overrides(drawn))
    for key, value in drawn.items():
        if "." in key:  # a config group (estimator=...) is not a value to read back
            assert OmegaConf.select(cfg, key) == value, key
