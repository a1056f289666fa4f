"""Runs and sweeps a researcher can trust: launchers, summaries, resume integrity, failure records, curves."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_experiments import ROOT, run_train

import metaopt as mo
from metaopt import estimators as E
from metaopt.checkpoint import load_checkpoint
from metaopt_hydra.records import changed_keys, check_outcome
from metaopt_hydra.summary import collect_runs, dry_run_totals, duration, markdown_table
from metaopt_hydra.threads import choose_threads


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_contract_submitit_sweep_and_summary(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "experiments/train.py", "--multirun", "hydra/launcher=submitit_local",
                             "debug=tiny", "seed=0,1", f"hydra.sweep.dir={sweep}"], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = subprocess.run([sys.executable, "experiments/summarize.py", str(sweep)], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
    assert summary.returncode == 0, summary.stderr
    rows = [line for line in summary.stdout.splitlines() if line.startswith("| ") and "| ok |" in line]
    assert len(rows) == 2 and "seed=0" in rows[0] and "seed=1" in rows[1]
    assert "  debug=tiny: seeds 0,1 (2 of 2 ended ok): meta_test_loss " in summary.stdout  # and not as table rows
    assert (sweep / "summary.csv").read_text().count("\n") == 3  # header + 2 runs
    job = _metrics(sweep / "0")  # job_time_limit=auto: the launcher's timeout (submitit_local's 60 min) less a minute
    assert job["job_time_limit"] == 59 * 60 and job["job_within_limit"]


def test_sweep_with_a_failing_job_keeps_the_others_and_reports_it(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "experiments/train.py", "--multirun", "debug=tiny",
                             "budget.memory=1MB,null", "inner_steps=150", f"hydra.sweep.dir={sweep}"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "budget.memory=1MB" in result.stderr and "BudgetExceeded" in result.stderr
    rows = {r["overrides"]: r for r in collect_runs(sweep)}
    assert rows["debug=tiny budget.memory=1MB inner_steps=150"]["status"] == "failed"
    assert "predicts" in rows["debug=tiny budget.memory=1MB inner_steps=150"]["error"]
    assert rows["debug=tiny budget.memory=null inner_steps=150"]["status"] == "ok"


def test_summary_lists_failed_and_missing_runs_without_crashing(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.json").write_text(json.dumps({"status": "ok", "meta_test_loss": 0.5}))
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "metrics.json").write_text(json.dumps({"status": "failed", "error": "ValueError: x"}))
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # killed before writing metrics.json
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "metrics.json").write_text("{half a fi")
    rows = collect_runs(tmp_path)
    assert [(r["run"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed"), ("2", "missing"),
                                                       ("3", "unreadable")]
    table = markdown_table(rows)
    assert "ValueError: x" in table and "0.5" in table


def test_a_sweep_of_dry_runs_is_summarized_as_planned_with_its_price(tmp_path):
    """`-m ... dry_run=true` prices a sweep before it is submitted: summarize lists each job as planned (not as
    missing: there is no metrics.json), a failed pricing as failed, and sums the price."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "experiments/train.py", "-m", "debug=tiny", "dry_run=true",
                             "job_time_limit=10m", "meta_steps=100,200", f"hydra.sweep.dir={sweep}"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep / "2").mkdir()
    (sweep / "2" / "dry_run.json").write_text(json.dumps({"status": "failed", "error": "ValueError: y"}))
    rows = collect_runs(sweep)
    assert [(r["run"], r["status"]) for r in rows] == [("0", "planned"), ("1", "planned"), ("2", "failed")]
    assert [r["meta_steps"] for r in rows[:2]] == [100, 200] and rows[1]["predicted_run_seconds"] > 0
    records = [r["_metrics"] for r in rows[:2]]
    total = records[0]["predicted_run_seconds"] + records[1]["predicted_run_seconds"]
    assert dry_run_totals(rows).startswith(f"priced by dry runs: 2 run(s), {duration(total)} predicted in all")
    assert dry_run_totals(rows).endswith("; 2 of 2 within their job_time_limit")
    summary = subprocess.run([sys.executable, "experiments/summarize.py", str(sweep)], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=120)
    assert summary.returncode == 0 and "3 run(s): 0 ok, 2 planned (dry runs), 1 not ok" in summary.stdout
    assert summary.stdout.rstrip().splitlines()[-1] == dry_run_totals(rows)
    assert dry_run_totals(rows[2:]) is None


@pytest.mark.parametrize("launcher, parallel", [
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 1),  # jobs in turn
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 3}, 3),
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
      "array_parallelism": 64}, 64),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": "${oops}"}, 1),
])
def test_a_priced_sweeps_wall_clock_follows_its_launchers_parallelism(tmp_path, launcher, parallel):
    from metaopt_hydra.summary import launcher_parallelism
    assert [duration(s) for s in (45.0, 750.0, 11520.0)] == ["45 s", "12.5 min", "3.2 h"]
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "hydra.yaml").write_text(json.dumps({"hydra": {"launcher": launcher}}))
    assert launcher_parallelism(tmp_path) == parallel
    rows = [{"status": "planned", "_metrics": {"predicted_run_seconds": s * 3600.0, "predicted_peak_bytes": 1e6}}
            for s in (3, 2, 2, 1)]
    # Longest first, each to the slot free first: on 2 at a time {3, 1} and {2, 2}: 4 h; on 3: {3}, {2, 1}, {2}: 3 h.
    assert dry_run_totals(rows, 2).endswith("; 2 at a time (the launcher's): about 4 h")
    assert dry_run_totals(rows, 3).endswith("about 3 h") and "at a time" not in dry_run_totals(rows, 1)
    assert dry_run_totals(rows, 64).endswith("about 3 h")  # never less than the longest job


def test_summary_says_which_runs_a_time_limit_stopped(tmp_path):
    for run, stopped_by in (("0", "job_time_limit"), ("1", None)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.json").write_text(json.dumps({"status": "ok", "stopped_by": stopped_by,
                                                                  "job_seconds": 3300.0}))
    rows = collect_runs(tmp_path)
    assert rows[0]["stopped_by"] == "job_time_limit" and "stopped_by" not in rows[1]
    table = markdown_table(rows).splitlines()
    assert "stopped_by" in table[0] and "job_seconds" in table[0] and "None" not in table[3]


def test_summary_has_a_column_per_evaluation_protocol(tmp_path):
    (tmp_path / "0").mkdir()
    protocols = {"within_alphabet_20way": {"test_accuracy": 0.715}, "skipped_one": {"skipped": "5-way head"}}
    (tmp_path / "0" / "metrics.json").write_text(json.dumps({"status": "ok", "protocols": protocols}))
    rows = collect_runs(tmp_path)
    assert rows[0]["within_alphabet_20way_accuracy"] == 0.715 and "skipped_one_accuracy" not in rows[0]
    header = markdown_table(rows).splitlines()[0]
    assert "within_alphabet_20way_accuracy" in header and "_metrics" not in header


def test_contract_resume_with_another_config_is_refused_naming_the_key(tmp_path):
    assert run_train(tmp_path, "debug=tiny").returncode == 0
    before = _metrics(tmp_path)
    result = run_train(tmp_path, "debug=tiny", "estimator=first_order")
    assert result.returncode != 0 and "estimator" in result.stderr
    assert _metrics(tmp_path) == before  # the directory's own run is untouched
    assert "estimator" in json.loads((tmp_path / "refused.json").read_text())["error"]
    fresh = run_train(tmp_path, "debug=tiny", "estimator=first_order", "resume=fresh")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert _metrics(tmp_path)["estimator"] == "first_order" and (tmp_path / "checkpoint.pt.replaced").exists()


def test_changed_keys_ignore_what_may_change_on_resume():
    before = {"meta_steps": 20, "estimator": {"_target_": "metaopt.Full"}, "eval": {"n_tasks": 600}, "seed": 0}
    now = {"meta_steps": 40, "estimator": {"_target_": "metaopt.Full"}, "eval": {"n_tasks": 100}, "seed": 1}
    assert changed_keys(before, now) == ["seed"]


@pytest.mark.parametrize("override,message", [
    ("budget.memory=abc", "cannot parse 'abc'"),
    ("dtype=float16", "dtype=float16 on device=cpu"),
    ("model=conv4", "model=Conv4 cannot take the inputs of task=Sinusoid"),
    ("metaparam=synthetic", "metaparam.data=SyntheticData cannot serve task=Sinusoid with model=MLP: the task's "
                            "support inputs have shape (1,), the slot's (64,)"),
    ("experiment=learned_optimizer_online estimator=auto", "estimator=Auto takes no `population` (estimator.population"
                                                          "=16: the config sets it for another estimator"),
    ("eval.n_tasks=-1", "eval.n_tasks must be >= 0"),
    ("compile=yes", "compile = 'yes': use true, false or auto"),
    ("job_time_limit=1ms", "which leaves nothing for training"),
])
def test_contract_failures_before_work_leave_a_record(tmp_path, override, message):
    result = run_train(tmp_path, "debug=tiny", *override.split())
    assert result.returncode != 0 and message in result.stderr
    record = _metrics(tmp_path)
    assert record["status"] == "failed" and message in record["error"]
    assert message in (tmp_path / "train.log").read_text()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_no_meta_test_tasks_skips_the_meta_test_and_the_protocols_said_why(tmp_path):
    result = run_train(tmp_path, "debug=tiny", "eval.n_tasks=0", "+eval.protocols.more_shots.k_shot=20")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = _metrics(tmp_path)
    assert metrics["status"] == "ok" and "test_accuracy" not in metrics and "meta_test_loss" not in metrics
    assert metrics["meta_test_skipped"].startswith("eval.n_tasks=0")
    assert metrics["protocols"]["more_shots"]["skipped"] == "eval.n_tasks=0"
    assert "meta-test skipped" in result.stdout


def test_a_job_time_limit_reserves_the_evaluations_planned_before_training(tmp_path):
    result = run_train(tmp_path, "debug=tiny", "job_time_limit=10m", "+eval.protocols.more_shots.k_shot=20")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = _metrics(tmp_path)
    assert set(metrics["job_reserved"]) == {"the final evaluation (4 tasks)", "Validation at the end",
                                            "protocol more_shots (4 tasks)"}
    assert metrics["job_time_limit"] == 600 and metrics["job_within_limit"] and metrics["stopped_by"] is None
    assert metrics["job_seconds"] >= metrics["train_seconds"] and "meta_test_loss" in metrics["protocols"]["more_shots"]
    log = (tmp_path / "train.log").read_text()
    assert log.index("protocol more_shots: ") < log.index("left for training") < log.index("meta-step 1/")


def test_a_dry_run_prices_the_run_without_touching_its_directory(tmp_path):
    """dry_run=true: the plan, timed meta-steps on copies, the evaluations planned, the totals; written to
    dry_run.json (a real run's metrics.json and checkpoint in the same directory stay as they were)."""
    assert run_train(tmp_path, "debug=tiny").returncode == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("metrics.json", "checkpoint.pt")}
    result = run_train(tmp_path, "debug=tiny", "dry_run=true", "job_time_limit=10m", "meta_steps=1000")
    assert result.returncode == 0, result.stderr[-2000:]
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    record = json.loads((tmp_path / "dry_run.json").read_text())
    # The directory's run finished debug=tiny's 2 meta-steps: resumed with meta_steps=1000, 998 are left to train.
    assert record["status"] == "planned" and record["timed_meta_steps"] == 5 and record["meta_steps"] == 998
    assert record["resumed_from_meta_step"] == 2 and "(resumed from meta-step 2)" in result.stdout
    assert record["predicted_train_seconds"] == pytest.approx(998 * record["seconds_per_meta_step"])
    assert set(record["predicted_evaluations"]) == {"the final evaluation (4 tasks)", "validation (4 tasks)"}
    assert record["predicted_run_seconds"] > record["predicted_train_seconds"] > 0
    assert record["meta_steps_within_job_limit"] > 1000  # 10 minutes hold far more than 1000 tiny steps
    assert "training: 998 meta-steps (resumed" in result.stdout and "the whole run: " in result.stdout
    refused = run_train(tmp_path, "debug=tiny", "dry_run=true", "seed=7")  # the run itself would refuse to resume
    assert refused.returncode != 0 and "changed: seed" in json.loads((tmp_path / "dry_run.json").read_text())["error"]
    fresh = run_train(tmp_path, "debug=tiny", "dry_run=true", "seed=7", "resume=fresh", "meta_steps=1000")
    assert fresh.returncode == 0 and json.loads((tmp_path / "dry_run.json").read_text())["meta_steps"] == 1000
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # resume=fresh moved nothing
    failed = run_train(tmp_path, "debug=tiny", "dry_run=true", "budget.memory=abc", "resume=fresh")
    assert failed.returncode != 0 and (tmp_path / "metrics.json").read_bytes() == before["metrics.json"]
    assert "cannot parse 'abc'" in json.loads((tmp_path / "dry_run.json").read_text())["error"]


def test_a_dry_run_prices_training_within_the_time_limit_and_for_every_member():
    from metaopt_hydra.pricing import training_seconds as _training_seconds
    cfg = OmegaConf.create({"meta_steps": 1000, "time_limit": None})
    assert _training_seconds(cfg, 0.5) == (500.0, 1000)
    assert _training_seconds(OmegaConf.create({"meta_steps": 1000, "time_limit": "100s"}), 0.5) == (100.0, 200)
    assert _training_seconds(OmegaConf.create({"meta_steps": 1000, "time_limit": None, "ensemble": 2}), 0.5) == \
        (1000.0, 2000)


def test_a_dry_run_prices_what_each_member_of_a_resumed_ensemble_has_left():
    """Members share what is left of time_limit in turn (as train_ensemble shares it): member 0 has spent 30 s of
    its 50-s share (30 steps), so 20 steps are left; member 1 then gets the 50 s left: 50 steps at 1 s each."""
    from metaopt_hydra.build import member_config
    from metaopt_hydra.dry_run import _training
    cfg = OmegaConf.create({"meta_steps": 1000, "time_limit": "100s", "ensemble": 2, "seed": 0})
    resumed = [(member_config(cfg, 0), {"meta_step": 30, "train_seconds": 30.0}), (member_config(cfg, 1), None)]
    assert _training(cfg, resumed, 1.0) == (70.0, 70, 30)
    unlimited = OmegaConf.create({"meta_steps": 100, "time_limit": None, "ensemble": 2, "seed": 0})
    resumed = [(member_config(unlimited, 0), {"meta_step": 100, "train_seconds": 9.0}),
               (member_config(unlimited, 1), {"meta_step": 40, "train_seconds": 4.0})]
    assert _training(unlimited, resumed, 0.5) == (30.0, 60, 140)  # 0 and 60 steps left


def test_a_run_writes_curves_threads_and_validation(tmp_path):
    result = run_train(tmp_path, "debug=tiny", "threads=1", "eval.val_every=1")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = _metrics(tmp_path)
    assert metrics["threads"] == 1 and math.isfinite(metrics["val_loss"])
    assert all("val_loss" in h for h in metrics["history"])
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_threads_auto_follows_the_environment_and_the_launcher(monkeypatch):
    cfg = OmegaConf.create({"threads": "auto"})
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(cfg) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0))
    assert choose_threads(cfg) == cores
    joblib = OmegaConf.create({"_target_": "hydra_plugins.hydra_joblib_launcher.JoblibLauncher", "n_jobs": cores})
    assert choose_threads(cfg, joblib) == 1
    assert choose_threads(OmegaConf.create({"threads": 5})) == 5
    with pytest.raises(ValueError, match="threads=0"):
        choose_threads(OmegaConf.create({"threads": 0}))


def test_a_non_finite_final_metric_or_all_tasks_skipped_is_a_failure():
    assert "nan" in check_outcome({"meta_test_loss": float("nan")})
    assert "skipped" in check_outcome({"meta_test_loss": 1.0, "meta_steps": 2, "meta_batch_size": 3,
                                       "tasks_skipped": 6})
    assert check_outcome({"meta_test_loss": 1.0, "meta_steps": 2, "meta_batch_size": 3, "tasks_skipped": 5}) is None


RESUMED = {"full": E.Full, "es": lambda: E.EvolutionStrategies(population=2),
           "pes": lambda: E.PersistentES(population=2, k=1), "forward_random": lambda: E.ForwardMode(mode="random"),
           "first_order": E.FirstOrder, "checkpoint": lambda: E.Checkpoint(segment=1), "reptile": E.Reptile,
           "truncated": lambda: E.Truncated(k=1)}


def test_a_resumed_run_keeps_the_batching_its_checkpoint_recorded(tmp_path):
    """`auto` times the batchings; a resumed session timed on a loaded machine must not switch (its sums would
    round differently). Stand-in timers make the first session pick one task at a time, the second stacked."""
    def run(steps: int, path: Path | None, loop_seconds: float) -> tuple[dict[str, torch.Tensor], dict]:
        torch.manual_seed(0)
        model = mo.MLP(1, (8,), 1)
        loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
        meta = mo.meta_params(mo.Init(model))
        metrics = mo.meta_train(loop, meta, E.Full(), mo.Sinusoid(k_shot=5),
                                outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-2), meta_steps=steps,
                                meta_batch_size=3, inner_steps=2, eval_n_tasks=0, progress=False,
                                checkpoint_path=path, timer=lambda e, t, b: 1.0 if b != "loop" else loop_seconds)
        return {k: v.clone() for k, v in meta.state_dict().items()}, metrics

    straight, first = run(6, None, loop_seconds=0.1)
    assert first["batching"] == "loop"
    run(3, tmp_path / "ckpt.pt", loop_seconds=0.1)
    resumed, metrics = run(6, tmp_path / "ckpt.pt", loop_seconds=10.0)
    assert metrics["batching"] == "loop" and run(1, None, loop_seconds=10.0)[1]["batching"] == "stacked"
    for k, v in straight.items():
        assert torch.equal(resumed[k], v), k


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_resume_is_bit_exact_for_every_estimator(tmp_path, name):
    def run(steps: int, path: Path | None, seed_model: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed_model)
        model = mo.MLP(1, (8,), 1)
        loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
        meta = mo.meta_params(mo.Init(model))
        mo.meta_train(loop, meta, RESUMED[name](), mo.Sinusoid(k_shot=5),
                      outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-2), meta_steps=steps,
                      meta_batch_size=3, inner_steps=2, eval_n_tasks=0, progress=False, checkpoint_path=path)
        return {k: v.clone() for k, v in meta.state_dict().items()}

    straight = run(6, None)
    run(3, tmp_path / "ckpt.pt")
    torch.manual_seed(123)  # the resumed process's random state differs: it must come from the checkpoint
    torch.rand(17)
    resumed = run(6, tmp_path / "ckpt.pt", seed_model=99)
    for k, v in straight.items():
        assert torch.equal(resumed[k], v), k


def test_non_finite_meta_parameters_are_never_checkpointed(tmp_path):
    torch.manual_seed(0)
    model = mo.MLP(1, (8,), 1)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    path = tmp_path / "ckpt.pt"
    opt = torch.optim.SGD(meta.parameters(), lr=float("inf"))  # the first step makes the parameters inf
    mo.meta_train(loop, meta, E.Full(), mo.Sinusoid(k_shot=5), outer_optimizer=opt, meta_steps=1,
                  meta_batch_size=2, inner_steps=1, eval_n_tasks=0, progress=False, checkpoint_path=path,
                  checkpoint_every=1, on_nan="skip")
    assert not all(bool(torch.isfinite(p).all()) for p in meta.parameters())
    assert not path.exists()


class FakeWandb:
    """Records what WandbLogger asks of wandb (no wandb install or server needed)."""

    def __init__(self):
        self.inits, self.logged, self.saved, self.finished = [], [], [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, metrics, step):
                fake.logged.append((step, metrics))

            def save(self, path, base_path, policy):
                fake.saved.append(Path(path).name)

            def finish(self, exit_code):
                fake.finished.append(exit_code)

        return Run()


def test_wandb_logger_continues_the_run_groups_sweeps_and_reports_failure(monkeypatch, tmp_path):
    from metaopt_hydra.loggers import WandbLogger
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(project="p", tags=["t"])
    logger.start(tmp_path, {"seed": 0}, "abc123", "multirun/sweep")
    logger.log({"meta_train_loss": 0.5, "note": "text"}, 10)
    (tmp_path / "metrics.json").write_text("{}")
    logger.artifact(tmp_path / "metrics.json")
    logger.finish(1)
    init = fake.inits[0]
    assert (init["id"], init["resume"], init["group"], init["mode"]) == ("abc123", "allow", "multirun/sweep",
                                                                         "disabled")
    assert fake.logged == [(10, {"meta_train_loss": 0.5})] and fake.saved == ["metrics.json"]
    assert fake.finished == [1]


def test_resumed_run_keeps_its_logger_id(tmp_path):
    assert run_train(tmp_path, "debug=tiny", "meta_steps=1").returncode == 0
    first = load_checkpoint(tmp_path / "checkpoint.pt")["logger_run_id"]
    assert run_train(tmp_path, "debug=tiny", "meta_steps=2").returncode == 0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["logger_run_id"] == first


@pytest.mark.parametrize("sent, error", [("SIGINT", "KeyboardInterrupt"), ("SIGTERM", "JobTerminated: SIGTERM")])
def test_ctrl_c_or_sigterm_writes_an_interrupted_record_and_keeps_the_checkpoint(tmp_path, sent, error):
    """Ctrl-C, or SIGTERM (a scheduler's preemption or cancellation, `kill`): the record says so and the last
    completed meta-step is checkpointed on the way out (no periodic checkpoint is due in this run)."""
    import signal
    import time
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "experiments/train.py", f"hydra.run.dir={tmp_path}", "meta_steps=100000",
                                "checkpoint_every=0", "progress=false", "log_every=50"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    log = tmp_path / "train.log"
    while not (log.exists() and "meta-step 50/" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (tmp_path / "checkpoint.pt").exists()
    process.send_signal(getattr(signal, sent))
    process.wait(timeout=60)
    assert process.returncode != 0
    record = _metrics(tmp_path)
    assert record["status"] == "interrupted" and error in record["error"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["meta_step"] >= 50


def test_online_run_trains_windows_of_a_long_unroll_and_evaluates_at_the_horizon(tmp_path):
    result = run_train(tmp_path, "debug=tiny", "estimator=online_pes", "estimator.population=2", "online_horizon=4",
                       "meta_steps=3", "eval.inner_steps=4")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = _metrics(tmp_path)
    assert metrics["status"] == "ok" and metrics["estimator_chosen"] == "online_pes"
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    # staggered: task 1's first unroll is 2 steps, so it restarts at step 2 and task 0 at step 3
    assert ckpt["task_source"].position == [2, 4] and ckpt["task_source"].length == [4, 4]
    assert ckpt["carry"].plus.params["net.0.weight"].shape[:2] == (2, 1)
    refused = run_train(tmp_path / "full", "debug=tiny", "online_horizon=4")
    assert refused.returncode != 0 and "only an online estimator can continue" in refused.stderr


def test_compile_auto_records_its_choice_and_a_short_run_stays_eager(tmp_path):
    result = run_train(tmp_path, "debug=tiny", "compile=auto")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = _metrics(tmp_path)
    assert metrics["status"] == "ok" and metrics["compiled"] is False and metrics["compile_choice"] == "eager"
    assert metrics["compile_seconds"] == 0 and "under the 60 s after which compiling may pay" in metrics["plan"]
    assert metrics["predicted_eval_seconds"] > 0 and metrics["eval_seconds"] > 0


def test_runs_that_differ_only_in_seed_are_summarized_over_seeds():
    from metaopt_hydra.summary import over_seeds

    def row(overrides, status="ok", **metrics):
        return {"overrides": overrides, "status": status, **metrics}

    rows = [row("seed=0 lr=1", meta_test_loss=1.0, train_seconds=10.0),
            row("seed=1 lr=1", meta_test_loss=3.0, train_seconds=30.0),
            row("seed=2 lr=1", status="failed"),
            row("seed=0 lr=2", meta_test_loss=5.0, train_seconds=7.0),
            row("lr=3", meta_test_loss=9.0)]  # no seed override: not a group
    lines = over_seeds(rows).splitlines()
    # lr=2 has one seed: no spread, no line
    assert lines == ["  lr=1: seeds 0,1,2 (2 of 3 ended ok): meta_test_loss 2 ± 1.4, train_seconds 20 ± 14"]
    assert over_seeds(rows[3:]) is None
    rows[1]["status"] = "failed"
    assert "meta_test_loss 1 (one run)" in over_seeds(rows)
