"""One training run from a config: what `experiments/train.py` (and the explorer's trials) run.

In order: threads (before any work), the resume check (a checkpoint made with another
config is refused, naming the keys that changed, unless `resume=fresh`), building and
checking the parts, the logger (the same logged run continues on resume), training,
the optional learned-vs-baseline comparison, then `metrics.json`, `curves.png` and the
logger's artifacts. Every way out leaves `metrics.json`: "ok"; "failed" with the error
(also in train.log) for any error, a non-finite final metric or every task skipped;
"interrupted" for Ctrl-C. The return value is the objective (`objective`, default
meta_test_loss) as a float, so Hydra sweepers can optimize it.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from metaopt import evaluate
from metaopt.evaluation import EvalPlan
from metaopt.allocator import set_allocator
from metaopt.budget import parse_seconds
from metaopt.checkpoint import load_checkpoint, save_atomic
from metaopt.deadline import Deadline
from metaopt.ensemble import ProtoNetEnsemble, ensemble_meta
from metaopt_hydra.baselines import compare
from metaopt_hydra.comparison import plan_comparison
from metaopt_hydra.build import (Parts, build, compile_record, member_config, plan_config_evaluation,
                                 train_from_config)
from metaopt_hydra.curves import plot_curves
from metaopt_hydra.loggers import NullLogger, RunLogger, new_run_id
from metaopt_hydra.dry_run import dry_run
from metaopt_hydra.jobs import job_deadline, job_started, terminated_as_interrupted
from metaopt_hydra.liveness import marked_running
from metaopt_hydra.protocols import evaluate_protocols, plan_protocols
from metaopt_hydra.records import (
    ResumeMismatch,
    check_outcome,
    checkpoint_changes,
    failure_record,
    resolved,
    write_json_atomic,
)
from metaopt_hydra.threads import apply_threads, choose_threads

__all__ = ["run_training", "train_ensemble", "RunFailed"]

log = logging.getLogger("metaopt")


class RunFailed(RuntimeError):
    """Training finished, but its outcome is not usable (see `records.check_outcome`)."""


def _hydra() -> tuple[Path, DictConfig | None, str | None]:
    """(the run directory, the launcher config under --multirun, the sweep directory under --multirun)."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return Path(hc.runtime.output_dir), hc.launcher if multirun else None, hc.sweep.dir if multirun else None


def previous_run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The checkpoint's record of an earlier session in `run_dir` ({} when none), after checking that it was
    made with the same config (outside `records.RESUMABLE_KEYS`).

    Raises:
      ResumeMismatch: naming the keys that changed; `resume=fresh` starts over instead (the old
        checkpoint is kept as checkpoint.pt.replaced).
    """
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return {}
    ckpt = load_checkpoint(path)
    refusal = checkpoint_changes(cfg, ckpt, run_dir)
    if refusal is None:
        return {"logger_run_id": ckpt.get("logger_run_id")}
    if cfg.get("resume", "check") == "fresh":
        path.replace(run_dir / "checkpoint.pt.replaced")
        log.warning("resume=fresh: %s was made with another config (%s); starting over", path,
                    ", ".join(refusal.changed))
        return {}
    raise refusal


ENSEMBLE_SUMS = ("meta_steps", "meta_steps_asked", "train_seconds", "tasks_skipped", "tasks_nan_skipped",
                 "tasks_truncated")
"""Counts an ensemble run's metrics.json gives over all its members."""


def train_ensemble(cfg: DictConfig, parts: Parts, run_dir: Path, *, log: Callable[[dict, int], None] | None,
                   checkpoint_extra: dict[str, Any], deadline: Deadline | None = None) -> tuple[dict[str, Any], Parts]:
    """Train an ensemble run's members (`ensemble: K`) one after another, member i in `run_dir/member{i}` as the
    standalone run of `member_config(cfg, i)` (so resumable alone, its config checked as any run's), each within
    an equal share of what remains of `time_limit` (and of the `deadline`'s training time); then meta-test them as
    one `ProtoNetEnsemble` (planned before the members train, reserved in `deadline`) and save their
    meta-parameters together in `run_dir/checkpoint.pt` (what `build(cfg)` loads). Returns the metrics (the
    members' counts summed, `ENSEMBLE_SUMS`; each member's in "members") and the parts with the ensemble."""
    count = int(cfg.ensemble)
    limit = parse_seconds(cfg.time_limit) if cfg.get("time_limit") is not None else None
    final = _plan_ensemble_evaluation(cfg, parts, deadline)
    if deadline is not None:
        deadline.check()
    members: list[Parts] = []
    records: list[dict[str, Any]] = []
    for i in range(count):
        member_cfg, member_dir = member_config(cfg, i), run_dir / f"member{i}"
        if limit is not None:  # an equal share of the training time left by the members before it
            with open_dict(member_cfg):
                member_cfg.time_limit = max((limit - sum(r["train_seconds"] for r in records)) / (count - i), 1.0)
        (member_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(member_cfg, member_dir / ".hydra" / "config.yaml")  # a run directory as any (scripts read it)
        previous_run(member_cfg, member_dir)
        member = build(member_cfg)
        metrics = train_from_config(member_cfg, member, member_dir, log=log, evaluate=False,
                                    checkpoint_extra={"config": resolved(member_cfg)},
                                    deadline=deadline.share(count - i) if deadline is not None else None)
        write_json_atomic({**metrics, "status": "ok", "config": resolved(member_cfg)}, member_dir / "metrics.json")
        members.append(member)
        records.append({"dir": member_dir.name, "seed": int(member_cfg.seed),
                        **{k: metrics[k] for k in (*ENSEMBLE_SUMS, "meta_train_loss", "stopped_at_time_limit")
                           if k in metrics}})
    if deadline is not None:
        deadline.end_training()
    loop = ProtoNetEnsemble([(m.loop, m.meta) for m in members])  # type: ignore[misc]
    meta = ensemble_meta([m.meta for m in members])
    out: dict[str, Any] = {**{k: v for k, v in metrics.items() if k != "history"}, "members": records,
                           **{k: sum(r.get(k, 0) for r in records) for k in ENSEMBLE_SUMS},
                           "stopped_at_time_limit": any(r.get("stopped_at_time_limit") for r in records)}
    if final is not None:
        assert parts.eval_tasks is not None
        out.update(evaluate(loop, meta, parts.eval_tasks, n_tasks=cfg.eval.n_tasks, inner_steps=cfg.eval.inner_steps,
                            batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, device=cfg.device, budget=parts.budget,
                            plan=final))
    for key in [k for k in out if k.startswith("job_")]:  # `Deadline.record()`'s: a member's share, not the run's
        out.pop(key)
    save_atomic({"meta": meta.state_dict(), **checkpoint_extra}, run_dir / "checkpoint.pt")
    return out, parts._replace(loop=loop, meta=meta)


def _plan_ensemble_evaluation(cfg: DictConfig, parts: Parts, deadline: Deadline | None) -> EvalPlan | None:
    """The ensemble's meta-test, planned before its members train (None: no meta-test)."""
    if parts.eval_tasks is None or cfg.eval.n_tasks <= 0:
        return None
    return plan_config_evaluation(cfg, parts, parts.eval_tasks, "the final evaluation", cfg.eval.n_tasks,
                                  deadline=deadline)  # with the untrained ensemble `build` made: the same shapes


def _finish(cfg: DictConfig, metrics: dict[str, Any], run_dir: Path, logger: RunLogger, threads: int,
            deadline: Deadline | None = None) -> None:
    metrics.update(status="ok", threads=threads, config=resolved(cfg))
    why = check_outcome(metrics)
    if why is not None:
        metrics.update(status="failed", error=f"RunFailed: {why}")
    plot_curves(metrics.get("history", []), run_dir / "curves.png",
                f"{metrics.get('estimator_config', metrics.get('estimator'))}, T={cfg.inner_steps}, "
                f"meta-batch {cfg.meta_batch_size}", metrics.get("train_seconds"))
    if deadline is not None:  # the whole session's, measured last: training, evaluations, comparison, the plot
        metrics.update(deadline.record())
        metrics["job_within_limit"] = metrics["job_seconds"] <= deadline.seconds
    write_json_atomic(metrics, run_dir / "metrics.json")
    logger.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, int(cfg.meta_steps))
    for name in ("metrics.json", "curves.png"):
        logger.artifact(run_dir / name)
    if why is not None:
        raise RunFailed(why)


def _report(cfg: DictConfig, metrics: dict[str, Any], run_dir: Path) -> None:
    if "meta_test_skipped" in metrics:
        print(f"meta-test skipped ({metrics['meta_test_skipped']}); {metrics['meta_steps']} meta-steps of "
              f"{metrics['estimator']} -> {run_dir / 'metrics.json'}")
        return
    summary = f"meta-test loss {metrics['meta_test_loss']:.4f} ± {metrics['meta_test_loss_ci95']:.4f}"
    if "test_accuracy" in metrics:
        summary += f", accuracy {100 * metrics['test_accuracy']:.2f} ± {100 * metrics['test_accuracy_ci95']:.2f}%"
    if "learned" in metrics:
        print(f"{metrics['metric']}: learned {metrics['learned']:.4f} ± {metrics['learned_ci95']:.4f}, baseline "
              f"{metrics['baseline']:.4f} ± {metrics['baseline_ci95']:.4f} ({metrics['baseline_name']}); "
              f"learned - baseline {metrics['difference']:+.4f} ± {metrics['difference_ci95']:.4f} "
              f"(paired, same tasks; {metrics['metric_direction']})")
    for name, scores in metrics.get("protocols", {}).items():
        if "skipped" in scores:
            print(f"protocol {name}: skipped ({scores['skipped']})")
        elif "test_accuracy" in scores:
            print(f"protocol {name}: accuracy {100 * scores['test_accuracy']:.2f} ± "
                  f"{100 * scores['test_accuracy_ci95']:.2f}% ({scores['task']})")
        else:
            print(f"protocol {name}: meta-test loss {scores['meta_test_loss']:.4f} ± "
                  f"{scores['meta_test_loss_ci95']:.4f} ({scores['task']})")
    print(f"{summary} (95% CI over {cfg.eval.n_tasks} tasks, {cfg.eval.inner_steps} inner step(s), "
          f"{metrics['estimator']}, {metrics['meta_steps']} meta-steps"
          f"{' (stopped at the time limit)' if metrics.get('stopped_at_time_limit') else ''}) -> {run_dir / 'metrics.json'}")


def run_training(cfg: DictConfig) -> float:
    """Train (or resume) the configured run in Hydra's run directory; return the objective. SIGTERM (preemption,
    cancellation) is handled as Ctrl-C is: the last completed meta-step checkpointed, an "interrupted" record
    (`metaopt_hydra.jobs.terminated_as_interrupted`)."""
    job_start = job_started()  # this job's wall clock (a sweep's later jobs in the same process: from now)
    with terminated_as_interrupted():
        return _run(cfg, job_start)


def _dry_run(cfg: DictConfig, run_dir: Path, launcher: DictConfig | None, job_start: float) -> float:
    """`dry_run=true`: price the run without training it (`metaopt_hydra.dry_run`); a failure is recorded in
    `dry_run.json`, never in the directory's `metrics.json` (it may hold a real run's)."""
    try:
        apply_threads(choose_threads(cfg, launcher))
        set_allocator(cfg.get("allocator", "system"))
        dry_run(cfg, run_dir, launcher, job_start)
    except Exception as error:
        write_json_atomic(failure_record(cfg, error), run_dir / "dry_run.json")
        log.error("dry run failed: %s: %s (record: %s)", type(error).__name__, error, run_dir / "dry_run.json")
        raise
    return math.nan


def _run(cfg: DictConfig, job_start: float) -> float:
    run_dir, launcher, sweep_dir = _hydra()
    with marked_running(run_dir):  # `running.json` while it runs: a summary tells a running job from a killed one
        return _run_in(cfg, job_start, run_dir, launcher, sweep_dir)


def _run_in(cfg: DictConfig, job_start: float, run_dir: Path, launcher: DictConfig | None,
            sweep_dir: str | None) -> float:
    if cfg.get("dry_run", False):
        return _dry_run(cfg, run_dir, launcher, job_start)
    logger: RunLogger = NullLogger()
    exit_code, started = 1, time.perf_counter()
    try:
        threads = choose_threads(cfg, launcher)
        apply_threads(threads)
        set_allocator(cfg.get("allocator", "system"))
        deadline = job_deadline(cfg, launcher, job_start)
        previous = previous_run(cfg, run_dir)
        parts = build(cfg)
        run_id = previous.get("logger_run_id") or new_run_id()
        logger = instantiate(cfg.logger)
        logger.start(run_dir, resolved(cfg), run_id, sweep_dir)
        extra = {"config": resolved(cfg), "logger_run_id": run_id}
        protocols = plan_protocols(cfg, parts, deadline)  # before training, as every evaluation after it
        comparison = plan_comparison(cfg, parts, deadline=deadline, run_dir=run_dir) if cfg.get("compare") else None
        if int(cfg.get("ensemble", 1)) > 1:
            metrics, parts = train_ensemble(cfg, parts, run_dir, log=logger.log, checkpoint_extra=extra,
                                            deadline=deadline)
        else:
            metrics = train_from_config(cfg, parts, run_dir, log=logger.log, checkpoint_extra=extra, deadline=deadline)
        metrics.update(compile_record(cfg, parts.estimator, metrics))
        if parts.meta_test_skipped is not None:
            metrics["meta_test_skipped"] = parts.meta_test_skipped
        if protocols:
            metrics["protocols"] = evaluate_protocols(cfg, parts, protocols)
        if cfg.get("compare"):
            metrics.update(compare(cfg, parts, run_dir, comparison))
        _finish(cfg, metrics, run_dir, logger, threads, deadline)
        exit_code = 0
    except KeyboardInterrupt as interrupted:
        write_json_atomic(failure_record(cfg, interrupted, "interrupted"), run_dir / "metrics.json")
        log.error("interrupted after %.1f s; the last checkpoint is kept", time.perf_counter() - started)
        raise
    except Exception as error:
        # A refused resume leaves the directory's own run (and its metrics.json) untouched.
        record = run_dir / ("refused.json" if isinstance(error, ResumeMismatch) else "metrics.json")
        if not isinstance(error, RunFailed):  # a RunFailed run already wrote its full record
            write_json_atomic(failure_record(cfg, error), record)
        log.error("run failed: %s: %s (record: %s)", type(error).__name__, error, record,
                  exc_info=not isinstance(error, (RunFailed, ResumeMismatch, ValueError)))
        raise
    finally:
        logger.finish(exit_code)
    _report(cfg, metrics, run_dir)
    objective = cfg.get("objective", "meta_test_loss")
    if objective not in metrics and "meta_test_skipped" in metrics:
        return math.nan  # nothing to score: the run's metrics.json says why
    return float(metrics[objective])
