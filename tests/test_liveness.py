"""A sweep summarized while it runs tells running jobs from dead ones (`metaopt_hydra.liveness`)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_experiments import ROOT

from metaopt_hydra.liveness import RUNNING, RunDirectoryInUse, marked_running, running_record, start_ticks
from metaopt_hydra.summary import collect_runs


def _marker(run_dir: Path, **fields) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": start_ticks(), "started": time.time()}
    (run_dir / RUNNING).write_text(json.dumps({**record, **fields}))


def _gone_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_marker_lives_as_long_as_the_block_however_it_ends(tmp_path):
    with marked_running(tmp_path):
        marker = json.loads((tmp_path / RUNNING).read_text())
        assert marker["pid"] == os.getpid() and marker["start_ticks"] == start_ticks()
    assert not (tmp_path / RUNNING).exists()
    with pytest.raises(RuntimeError):
        with marked_running(tmp_path):
            raise RuntimeError("a failed run")
    assert not (tmp_path / RUNNING).exists()


def test_a_directory_a_live_process_runs_in_is_refused_untouched(tmp_path):
    _marker(tmp_path, started=123.0)
    with pytest.raises(RunDirectoryInUse, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        with marked_running(tmp_path):
            pass
    assert json.loads((tmp_path / RUNNING).read_text())["started"] == 123.0
    _marker(tmp_path, pid=_gone_pid())  # a killed run's marker: a new run takes the directory over
    with marked_running(tmp_path):
        assert json.loads((tmp_path / RUNNING).read_text())["pid"] == os.getpid()


def test_a_live_process_is_running_and_a_gone_or_reused_pid_is_missing(tmp_path):
    _marker(tmp_path)
    assert running_record(tmp_path)["status"] == "running" and "meta_steps" not in running_record(tmp_path)
    (tmp_path / "train.log").write_text("meta-step 5/10: loss 1\nmeta-step 7/10: loss 0.5\n")
    assert running_record(tmp_path)["meta_steps"] == 7  # how far it has come, from its log
    pid = _gone_pid()
    _marker(tmp_path, pid=pid)
    record = running_record(tmp_path)
    assert record["status"] == "missing" and f"pid {pid} on {socket.gethostname()}" in record["error"]
    _marker(tmp_path, start_ticks=start_ticks() - 1)  # this pid, but another process's start: a reused pid
    assert running_record(tmp_path)["status"] == "missing"
    _marker(tmp_path, host="another-node")
    record = running_record(tmp_path)
    assert record["status"] == "running?" and "another-node" in record["error"] and "not checkable" in record["error"]
    _marker(tmp_path, start_ticks=None)  # no /proc where it started: the pid alone
    assert running_record(tmp_path)["status"] == "running"
    _marker(tmp_path, start_ticks=None, pid=_gone_pid())
    assert running_record(tmp_path)["status"] == "missing"
    (tmp_path / RUNNING).write_text("{")  # half-written: as if there were none
    assert running_record(tmp_path) is None


def test_the_summary_reads_the_marker_before_an_earlier_sessions_record(tmp_path):
    run = tmp_path / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "interrupted", "error": "KeyboardInterrupt"}))
    _marker(run)  # resumed: running again
    assert collect_runs(tmp_path)[0]["status"] == "running"
    _marker(run, pid=_gone_pid())  # the resumed session was killed: the earlier record is what is known
    assert collect_runs(tmp_path)[0]["status"] == "interrupted"
    (run / "metrics.json").unlink()
    row = collect_runs(tmp_path)[0]
    assert row["status"] == "missing" and "is gone without a record" in row["error"]


def test_a_killed_run_is_told_from_a_running_one(tmp_path):
    """A real run: "running" in the summary while it trains (a second run in its directory refused, writing nothing),
    "missing" with its pid once SIGKILL ends it (no Python code runs: the marker stays), and no marker left by a run
    that ends normally."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "sweep" / "0"
    process = subprocess.Popen([sys.executable, "experiments/train.py", f"hydra.run.dir={run}", "meta_steps=100000",
                                "checkpoint_every=0", "progress=false", "log_every=50"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "train.log").exists() or "meta-step 50/" not in (run / "train.log").read_text():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    summary = subprocess.run([sys.executable, "experiments/summarize.py", str(tmp_path / "sweep")], cwd=ROOT,
                             env=env, capture_output=True, text=True)
    assert "| running |" in summary.stdout and "1 run(s): 0 ok, 1 running, 0 not ok" in summary.stdout
    assert collect_runs(tmp_path / "sweep")[0]["meta_steps"] >= 50
    twice = subprocess.run([sys.executable, "experiments/train.py", f"hydra.run.dir={run}", "debug=tiny"], cwd=ROOT,
                           env=env, capture_output=True, text=True)  # the same job submitted twice
    assert twice.returncode != 0 and "is in use: pid" in twice.stderr and not (run / "metrics.json").exists()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    row = collect_runs(tmp_path / "sweep")[0]
    assert row["status"] == "missing" and f"pid {process.pid}" in row["error"]
    done = tmp_path / "done"
    finished = subprocess.run([sys.executable, "experiments/train.py", f"hydra.run.dir={done}", "debug=tiny"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
    assert finished.returncode == 0 and not (done / RUNNING).exists()


@pytest.mark.parametrize("answer, status, said", [
    ("RUNNING", "running", "SLURM job 77_3"), ("PENDING", "running", "PENDING"),
    ("TIMEOUT", "missing", "ended without a record (TIMEOUT)"), ("", "missing", "no longer in squeue"),
    (None, "running?", "not checkable")])
def test_a_slurm_job_on_another_host_is_asked_of_squeue(tmp_path, monkeypatch, answer, status, said):
    """From a login node: the marker names the SLURM job (an array's task as squeue names it), and squeue's state
    decides; without squeue, nothing can be checked."""
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    run = tmp_path / "run"
    run.mkdir()
    with marked_running(run):
        marker = json.loads((run / RUNNING).read_text())
    assert marker["slurm_job"] == "77_3"
    _marker(run, host="node-12", slurm_job="77_3")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if answer is not None:
        squeue = bin_dir / "squeue"
        squeue.write_text(f"#!/bin/sh\ncase \"$*\" in *--jobs=77_3*) printf '{answer}\\n';; esac\n")
        squeue.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) if answer is None else f"{bin_dir}:{os.environ['PATH']}")
    record = running_record(run)
    assert record["status"] == status and said in (record.get("by", "") + record["error"])
