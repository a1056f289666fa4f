"""The Hydra entry points run end to end and keep the contract files and keys."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), f"hydra.run.dir={run_dir}",
                           *overrides], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def run_experiment(script: str, *args: str) -> list[str]:
    """Run `experiments/<script>` on one thread from the repository root and return its stdout lines; it must exit 0
    (the failure message shows the output's tail)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout.strip().splitlines()


@pytest.mark.parametrize("experiment", [None, "sinusoid_maml", "sinusoid_metasgd"])
def test_train_writes_metrics_and_checkpoint(tmp_path, experiment):
    overrides = ["debug=tiny"] + ([f"experiment={experiment}"] if experiment else [])
    result = run_train(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("meta_test_loss", "meta_test_loss_ci95", "meta_steps", "estimator"):
        assert key in metrics, key
    assert metrics["meta_steps"] == 2 and metrics["estimator"] == "full"
    assert (tmp_path / "checkpoint.pt").exists()
    assert "meta-test loss" in result.stdout


def test_train_with_first_order_and_top_level_overrides(tmp_path):
    result = run_train(tmp_path, "debug=tiny", "estimator=first_order", "inner_steps=3", "meta_steps=3", "seed=2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["estimator"], metrics["meta_steps"], metrics["inner_steps"]) == ("first_order", 3, 3)


def test_unknown_estimator_fails_before_training(tmp_path):
    result = run_train(tmp_path, "estimator=nonsense")
    assert result.returncode != 0
    assert "estimator" in result.stderr and "nonsense" in result.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_contract_impossible_budget_fails_fast_with_the_prediction(tmp_path):
    result = run_train(tmp_path, "estimator=full", "budget.memory=1MB", "inner_steps=150", "meta_batch_size=2")
    assert result.returncode != 0
    assert "BudgetExceeded" in result.stderr and "predicts" in result.stderr and "bytes" in result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "BudgetExceeded" in metrics["error"]
    assert not (tmp_path / "checkpoint.pt").exists()  # no training started


def test_contract_auto_fits_a_memory_saving_estimator(tmp_path):
    result = run_train(tmp_path, "estimator=auto", "budget.memory=4MB", "inner_steps=150", "meta_batch_size=2",
                       "meta_steps=2", "eval.n_tasks=4", "progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["estimator_chosen"] not in ("full", "auto")
    assert metrics["predicted_peak_bytes"] <= 4_000_000 and metrics["measured_peak_bytes"] >= 0


KIND_EXPERIMENTS = {
    "distill_digits": ["meta_steps=2", "eval.n_tasks=8", "compare.select_n_tasks=4", "inner_steps=2"],
    "learned_optimizer": ["meta_steps=2", "eval.n_tasks=4", "compare.select_n_tasks=2", "inner_steps=2",
                          "compare.eval_inner_steps=[2,4]", "metaparam.optimizer.hidden=4"],
    "learned_loss": ["meta_steps=2", "eval.n_tasks=8"],
}


@pytest.mark.parametrize("experiment", sorted(KIND_EXPERIMENTS))
def test_contract_kind_experiments_write_learned_and_baseline(tmp_path, experiment):
    result = run_train(tmp_path, f"experiment={experiment}", "progress=false", *KIND_EXPERIMENTS[experiment])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert isinstance(metrics["learned"], float) and isinstance(metrics["baseline"], float)
    assert metrics["metric_direction"] in ("lower is better", "higher is better")
    assert metrics["difference"] == pytest.approx(metrics["learned"] - metrics["baseline"], abs=1e-6)
    assert "learned" in result.stdout and "baseline" in result.stdout


def test_contract_learned_augmentation_on_generated_omniglot(tmp_path):
    from test_omniglot import _write
    data = tmp_path / "data"
    data.mkdir()
    _write(data, "images_background_small1", {"Greek": 3, "Latin": 2, "Korean": 2}, zipped=True)
    _write(data, "images_background_small2", {"Greek": 3, "Tagalog": 2}, zipped=True)
    run = tmp_path / "run"
    result = run_train(run, "experiment=learned_augmentation", f"data.root={data}", "task.size=16",
                       "model.channels=4", "meta_steps=2", "meta_batch_size=2",
                       "eval.n_tasks=4", "compare.select_n_tasks=4", "progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metric_direction"] == "higher is better" and 0 <= metrics["learned"] <= 1
    assert metrics["baseline_name"] == "maml"
    # The fixed-warps ablation: three warp sizes trained, the validation-best one meta-tested against learned.
    fixed = metrics["ablations"]["fixed_warps"]
    assert len(fixed["candidates"]) == 3 and fixed["label"] in fixed["candidates"]
    assert fixed["label"] == max(fixed["candidates"], key=fixed["candidates"].get)
    paired = fixed["at_inner_steps"]["1"]
    assert paired["learned"] == metrics["learned"]
    assert paired["difference"] == pytest.approx(paired["learned"] - paired["baseline"], abs=1e-6)
    assert sorted(p.name for p in (run / "ablations").iterdir()) == ["0", "1", "2"]


def test_check_cuda_device_sampling_runs_as_a_cpu_smoke_test():
    """check_cuda.py's checks that a GPU session runs first (Omniglot gathered on the device equals the CPU's
    tasks; the matmul convolution's meta-gradients; prefetching's parameters; the cudagraphs backend, there the
    traced graph run without CUDA graphs) run without a GPU on --device cpu,
    so the script and bench_gpu's generated Omniglot it imports stay runnable."""
    lines = run_experiment("check_cuda.py", "--device", "cpu", "--only", "sampling", "matmul", "prefetch", "graphs")
    out = "\n".join(lines)
    assert out.count("device sampling") == 2 and "all checks passed" in out
    assert "matmul convolution:" in out and "prefetch:" in out
    graphs = [line for line in lines if line.startswith("cudagraphs backend:")]
    assert len(graphs) == 1 and "largest relative difference 0.0e+00" in graphs[0]  # eager's kernels, in order


def test_bench_conv4_runs_small_and_prints_its_speedup_line():
    """bench_conv4.py on a 4-filter conv4 and 2 tasks: every variant's gradient agrees with the default's, and
    the last line has the contract's form (no assertion on the timings)."""
    lines = run_experiment("bench_conv4.py", "--channels", "4", "--meta-batch", "2", "--repeats", "1")
    assert re.fullmatch(r"speedup_vs_default maml:\d+\.\d\d protonet:\d+\.\d\d", lines[-1])
    differences = [float(row.split("|")[4]) for row in lines if row.startswith("| ") and "loop |" in row]
    assert len(differences) == 6 and max(differences) < 1e-2


def test_bench_stacking_runs_small_and_every_batching_computes_the_same_gradient():
    """bench_stacking.py on the sinusoid: each estimator's stacked and task-by-task gradients agree with its vmapped
    one, the stacked form holds no more tensor memory than the vmapped one, and the last line has its documented form
    (no assertion on the timings)."""
    names = ("full", "checkpoint", "truncated", "first_order", "forward")  # implicit: its float32 CG is ill-conditioned
    lines = run_experiment("bench_stacking.py", "--problems", "sinusoid", "--repeats", "1", "--estimators", *names)
    assert re.fullmatch("speedup_stacked_vs_vmap " + " ".join(rf"sinusoid/{n}:\d+\.\d\d" for n in names), lines[-1])
    rows = [row.split("|") for row in lines if row.startswith("| ") and row.endswith(" |") and "x |" in row]
    differences = [float(d) for row in rows for d in row[6].split(",")]
    assert len(rows) == 5 and max(differences) < 1e-4
    tensors = [[float(mb) for mb in row[8].split(",")] for row in rows]  # live tensor MB, stacked and vmapped
    assert all(0 < stacked <= 1.05 * vmapped for stacked, vmapped in tensors), tensors  # (a built, unused graph: 1.12)


def test_bench_es_runs_small_and_particles_in_one_pass_give_the_same_estimate():
    """bench_es.py on the sinusoid, population 4, stacked and vmapped: the one-pass estimates agree with one unroll
    after another (the same noise), stacked with vmapped, and the last two lines have their documented form (no
    assertion on the timings)."""
    lines = run_experiment("bench_es.py", "--problems", "sinusoid", "--repeats", "1", "--population", "4",
                           "--batchings", "stacked", "vmap")
    x = r"\d+\.\d\d"
    assert re.fullmatch(rf"speedup_particles_in_one_pass sinusoid/es/stacked:{x} sinusoid/es/vmap:{x} "
                        rf"sinusoid/pes/stacked:{x} sinusoid/pes/vmap:{x}", lines[-1])
    stacked = re.fullmatch(rf"speedup_stacked_vs_vmap sinusoid/es/1:{x} sinusoid/es/4:{x} sinusoid/pes/1:{x} "
                           rf"sinusoid/pes/4:{x} \(largest difference (\S+)\)", lines[-2])
    assert stacked and float(stacked.group(1)) < 1e-4, lines[-2]
    rows = [row.split("|") for row in lines if row.startswith("| ") and "x |" in row]
    assert len(rows) == 4 and max(float(row[6]) for row in rows) < 1e-4


def test_bench_eval_runs_small_and_both_plans_score_the_same_tasks_alike():
    """bench_eval.py on the sinusoid, 10 tasks, one round: the planner's evaluation and the vmapped one score the
    same tasks to float32 rounding, and the last line has its documented form (no assertion on the timings)."""
    lines = run_experiment("bench_eval.py", "--problems", "sinusoid", "--repeats", "1", "--tasks", "10")
    assert re.fullmatch(r"speedup_auto_vs_vmap sinusoid:\d+\.\d\d", lines[-1]), lines[-1]
    row = next(line for line in lines if line.startswith("| sinusoid |")).split("|")
    assert float(row[8]) < 1e-5 and "stacked" in row[2]


def test_bench_job_limit_runs_a_short_job_and_reports_it(tmp_path):
    """bench_job_limit.py on the sinusoid with a 10-s job: the run ends ok (or is refused before training, on a
    machine too loaded to set up in time), its row and the last line have their documented forms (no assertion on
    the wall clock)."""
    lines = run_experiment("bench_job_limit.py", "--problems", "sinusoid", "--limit", "10s", "--out", str(tmp_path))
    assert re.fullmatch(r"job_within_limit (sinusoid:\d+\.\d{3} )?\(\d/\d within; \d refused before training\)",
                        lines[-1]), lines[-1]
    row = next(line for line in lines if line.startswith("| sinusoid | 10s |"))
    metrics = json.loads((tmp_path / "sinusoid" / "metrics.json").read_text())
    assert ("refused before training" in row) == (metrics["status"] != "ok")
    assert metrics["status"] != "ok" or metrics["job_time_limit"] == 10.0 and metrics["job_after_training_seconds"] > 0


def test_bench_dry_run_prices_then_runs_and_reports_it(tmp_path):
    """bench_dry_run.py on the sinusoid, 200 meta-steps: the dry run's record and the run's, the row and the last
    line in their documented forms (no assertion on the wall clock)."""
    lines = run_experiment("bench_dry_run.py", "--problems", "sinusoid", "--meta-steps", "200", "--out", str(tmp_path))
    assert re.fullmatch(r"dry_run_measured_over_predicted sinusoid:\d+\.\d\d", lines[-1]), lines[-1]
    assert next(line for line in lines if line.startswith("| sinusoid | 200 |"))
    assert json.loads((tmp_path / "sinusoid_dry" / "dry_run.json").read_text())["status"] == "planned"
    assert not (tmp_path / "sinusoid_dry" / "metrics.json").exists()


def test_bench_es_times_online_pes_on_the_learned_optimizer_experiment():
    """bench_es.py's learned_optimizer_online problem (the experiment's config, population 2): the one-pass second
    window equals one at a time (the same noise, the same carried states), and the last line names it."""
    lines = run_experiment("bench_es.py", "--problems", "learned_optimizer_online", "--repeats", "1",
                           "--population", "2")
    assert re.fullmatch(r"speedup_particles_in_one_pass learned_optimizer_online/online_pes/vmap:\d+\.\d\d", lines[-1])
    rows = [row.split("|") for row in lines if row.startswith("| ") and "x |" in row]
    assert len(rows) == 1 and float(rows[0][6]) < 1e-4


def test_bench_budget_seconds_table_runs_small():
    """bench_budget.py's time table (predicted chunk seconds against measured, and the memory probes' free figure)
    runs and prints one row per estimator and chunk (no assertion on the timings beyond their being positive)."""
    lines = run_experiment("bench_budget.py", "--tables", "seconds", "--problems", "sinusoid", "--steps", "20",
                           "--estimators", "full", "first_order")
    rows = [line.split() for line in lines if line.startswith("sinusoid")]
    assert [row[2] for row in rows] == ["full()", "full()", "first_order()", "first_order()"]
    assert all(float(row[-5]) > 0 and float(row[-4]) > 0 and float(row[-2]) > 0 for row in rows)  # pred, meas, probed


def test_compiled_exactness_measures_the_compiled_program_not_its_fallback():
    """compiled_exactness.py's smoke run: aot_eager in float64 (the traced graphs, no code generation) is exact to
    rounding, eager batchings too (their max-pools counted, none routed apart), and the last line has its form."""
    lines = run_experiment("compiled_exactness.py", "--device", "cpu", "--meta-batch", "2", "--channels", "4",
                           "--backend", "aot_eager", "--dtype", "float64", "--repeats", "1")
    eager = [line for line in lines if line.startswith("eager ")]
    assert len(eager) == 3  # float64 against float64: every max-pool window routes alike, and there are some
    assert all(re.search(r"routed unlike float64: 0 of [1-9]\d*$", line) for line in eager)
    match = re.fullmatch(r"worst_error compiled:(\S+) eager:(\S+) ms_per_call:\d+\.\d\d", lines[-1])
    assert match and float(match[1]) < 1e-10 and float(match[2]) < 1e-10


def test_bench_gpu_runs_small_on_the_cpu_and_prints_its_headline_line():
    """bench_gpu.py's smoke run (no GPU): both convolutions' meta-steps, eager and compiled with backend="cudagraphs"
    (on the CPU torch runs the graph without CUDA graphs), agree with torch.func's gradient, the whole meta_train
    step runs with and without prefetching and overlapping, eager and compiled, and profiled, and the last line
    has its form (no assertion on the timings)."""
    lines = run_experiment("bench_gpu.py", "--device", "cpu", "--meta-batch", "2", "--steps", "1", "--channels", "4",
                           "--repeats", "1", "--conv", "native", "matmul", "--only", "metaopt", "metaopt-aotgraph",
                           "--train-steps", "2", "--profile-train")
    rows = [line for line in lines if line.startswith("whole meta_train step")]  # eager: in turn, prefetched, both
    assert [row.split("), ", 1)[1].split(" ms")[0].rsplit(" ", 1)[0] for row in rows] == [
        f"prefetch {p}, overlap {o}: {name}" for p, o, name in [  # then the fastest compiled: prefetched, both
            (False, False, "metaopt"), (True, False, "metaopt"), (True, True, "metaopt"),
            (True, False, "metaopt-aotgraph"), (True, True, "metaopt-aotgraph")]]
    profiled = [line for line in lines if line.startswith("whole-step profile (")]  # 8 steps after 5 unprofiled
    assert len(profiled) == 1 and "prefetch True, overlap True, 8 steps): wall " in profiled[0] and "host ops" in profiled[0]
    assert lines[-1].startswith("ms_per_step_T1_B2 metaopt:") and "metaopt[matmul]:" in lines[-1]
    assert "train_vs_bare:" in lines[-1]
