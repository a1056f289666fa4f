"""Whether a run with no final record yet is still running: `running.json` (host, pid, start) in its directory.

A run writes it when it starts and removes it when it ends, whichever way it ends in Python (ok, failed,
interrupted: the records say which); a process that is killed outright (SIGKILL, the out-of-memory killer, a lost
node) leaves it behind. `summarize.py` reads it for a run without `metrics.json`: on the same host, a live process
with that pid *and that start time* (a pid is reused) is "running"; a gone one is "missing", with where and when it
ran. A run under SLURM records its job, and from another host (a cluster's login node) `squeue` tells: a live job
is "running", an ended one (TIMEOUT, OUT_OF_MEMORY, ... or gone from squeue) "missing". Where nothing can be
checked (another host, no squeue): "running?", with how long ago the run last wrote a file. Before this, a sweep
summarized while it ran listed its running jobs as dead ("missing"). A second run started in a directory where a
live process on this host runs is refused before it touches anything.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from metaopt_hydra.records import write_json_atomic

__all__ = ["RUNNING", "RunDirectoryInUse", "marked_running", "running_record", "slurm_job", "slurm_state",
           "start_ticks"]

RUNNING = "running.json"
SLURM_LIVE = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "PENDING", "REQUEUED", "RESIZING")


def start_ticks(pid: int | str = "self") -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc: field 22 of its stat); None where it does
    not exist or the system has no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # after the command, which may hold spaces
    except (OSError, ValueError, IndexError):
        return None


class RunDirectoryInUse(RuntimeError):
    """Another live process on this host runs in the directory: two runs there would overwrite each other's
    checkpoints and records."""


@contextmanager
def marked_running(run_dir: Path) -> Iterator[None]:
    """`running.json` in `run_dir` while the block runs (removed however it ends, unless the process is killed).

    Raises:
      RunDirectoryInUse: a live process on this host already runs there (the same job submitted twice); nothing
        in the directory is touched.
    """
    path = run_dir / RUNNING
    live = running_record(run_dir)
    if live is not None and live["status"] == "running":
        raise RunDirectoryInUse(f"{run_dir} is in use: {live['by']} runs there (its {RUNNING}); two runs in one "
                                "directory would overwrite each other's checkpoints. Wait for it, or stop it first")
    write_json_atomic({"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": start_ticks(),
                       "started": time.time(), "slurm_job": slurm_job()}, path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def slurm_job() -> str | None:
    """This process's SLURM job as `squeue --jobs` names it ("123", or "123_4" for task 4 of an array, as
    submitit's array jobs run); None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def slurm_state(job: str) -> str | None:
    """SLURM's state of `job` ("RUNNING", "TIMEOUT", ...; "" where SLURM no longer knows it), or None where squeue
    cannot be asked (not on PATH, or no answer in 10 s)."""
    try:
        answer = subprocess.run(["squeue", "--noheader", f"--jobs={job}", "--states=all", "--format=%T"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return answer.stdout.strip().splitlines()[0].strip() if answer.returncode == 0 and answer.stdout.strip() else ""


def _last_written(run_dir: Path) -> float:
    """Seconds since the newest file directly in `run_dir` (its log, checkpoint, curves) was written."""
    times = [p.stat().st_mtime for p in run_dir.iterdir() if p.is_file()]
    return time.time() - max(times, default=time.time())


def _logged_meta_step(run_dir: Path) -> int | None:
    """The last meta-step the run's log reports (`meta-step N/M`, the end of its `.log` files), or None."""
    steps = None
    for log in sorted(run_dir.glob("*.log")):
        with open(log, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 65536, 0))
            found = re.findall(rb"meta-step (\d+)/\d+", f.read())
        if found:
            steps = max(steps or 0, int(found[-1]))
    return steps


def _alive(pid: int, ticks: int | None) -> bool:
    """Whether process `pid` lives and is the one that started at `ticks`; where the marker could not record a
    start (no /proc: not Linux), whether any process `pid` lives."""
    if ticks is not None:
        return start_ticks(pid) == ticks
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, another user's
    return True


def running_record(run_dir: Path) -> dict[str, Any] | None:
    """A summary record from the run's `running.json`: status "running" (its process lives: `job_seconds` so far and
    `meta_steps`, the last its log reports), "missing" (its process is gone: the error says where and when it ran)
    or "running?" (on another host: not checkable here); None where the run has no readable `running.json`."""
    try:
        marker = json.loads((run_dir / RUNNING).read_text())
        host, pid, ticks, started = marker["host"], int(marker["pid"]), marker["start_ticks"], float(marker["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    job = marker.get("slurm_job")
    state = slurm_state(job) if job and host != socket.gethostname() else None
    if state in SLURM_LIVE:
        return _running(run_dir, started, f"SLURM job {job} on {host} (since {since}, {state})")
    if state is not None:
        return {"status": "missing", "error": f"no metrics.json: SLURM job {job} (on {host}, started {since}) ended "
                                              f"without a record ({state or 'no longer in squeue'}): killed, e.g. "
                                              "past its time limit or out of memory"}
    if host != socket.gethostname():
        return {"status": "running?", "error": f"running.json: pid {pid} on {host} since {since}, not checkable from "
                                               f"here; last wrote a file {_last_written(run_dir):.0f} s ago"}
    if _alive(pid, ticks):
        return _running(run_dir, started, f"pid {pid} on {host} (since {since})")
    return {"status": "missing", "error": f"no metrics.json: its process (pid {pid} on {host}, started {since}) is "
                                          "gone without a record: killed (SIGKILL, out of memory) or the host "
                                          "restarted"}


def _running(run_dir: Path, started: float, by: str) -> dict[str, Any]:
    """A live run's record: `job_seconds` so far, `meta_steps` as its log last reports them, and who runs it."""
    step = _logged_meta_step(run_dir)
    return {"status": "running", "error": "", "job_seconds": time.time() - started, "by": by,
            **({} if step is None else {"meta_steps": step})}
