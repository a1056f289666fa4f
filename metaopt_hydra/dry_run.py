"""`dry_run=true`: what a run would cost, before it runs — memory, seconds per meta-step, evaluations, the total.

A researcher about to submit an hour-long job wants its price first. The dry run builds the config as the run would,
plans its meta-step (`metaopt.planning`: the batching, the chunks, the predicted peak), runs `DRY_RUN_STEPS`
meta-steps on copies of the meta-parameters (nothing is checkpointed) and takes their median seconds, prices the
meta-steps left (a checkpoint in the run directory is read as a resume would: its finished steps are not priced, one
made with another config is refused), plans every evaluation that follows training (the final meta-test,
`eval.protocols`, the validation at the end: `metaopt.evaluation.plan_ahead`), and prints and writes
(`dry_run.json` in the run directory, never `metrics.json`): the predicted seconds of training (meta_steps x the
median step, within `time_limit`, x the ensemble's members), of the evaluations and of the whole run, the peak, and,
under a `job_time_limit`, how many meta-steps fit. Approximate: measured steps at the start of a run (the median of
a few), evaluation plans as the run makes them. A baselines comparison (`compare`) is priced piece by piece
(`metaopt_hydra.comparison`): each candidate's training from its own timed steps, each evaluation from its plan.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from metaopt.budget import parse_seconds
from metaopt.checkpoint import load_checkpoint
from metaopt.deadline import RESERVE_MARGIN
from metaopt.guard import format_bytes
from metaopt_hydra.build import Parts, build, member_config, plan_config_evaluation, validation
from metaopt_hydra.comparison import plan_comparison
from metaopt_hydra.jobs import END_SECONDS, job_time_limit, process_age
from metaopt_hydra.pricing import TIMED_STEPS, left_to_train, timed_steps, training_seconds
from metaopt_hydra.protocols import plan_protocols
from metaopt_hydra.records import checkpoint_changes, resolved, write_json_atomic

__all__ = ["dry_run", "DRY_RUN_STEPS"]

log = logging.getLogger("metaopt")

DRY_RUN_STEPS = TIMED_STEPS
"""Meta-steps timed (the median is kept: the first pays one-off costs, e.g. a compilation)."""


def _evaluations(cfg: DictConfig, parts: Parts, run_dir: Path) -> dict[str, float | None]:
    """Predicted seconds of each piece of work after training ({what: seconds}; None: not timed): the
    evaluations, and a baselines comparison's training (what its candidates' checkpoints in `run_dir` have left)
    and evaluations."""
    out: dict[str, float | None] = {}
    if parts.eval_tasks is not None and cfg.eval.n_tasks > 0:
        plan = plan_config_evaluation(cfg, parts, parts.eval_tasks, "the final evaluation", cfg.eval.n_tasks)
        out[f"the final evaluation ({cfg.eval.n_tasks} tasks)"] = plan.predicted_seconds(cfg.eval.n_tasks)
    for protocol in plan_protocols(cfg, parts):
        if protocol.plan is not None:
            out[f"protocol {protocol.name} ({cfg.eval.n_tasks} tasks)"] = \
                protocol.plan.predicted_seconds(cfg.eval.n_tasks)
    validate = validation(cfg, parts) if int(cfg.get("ensemble", 1)) <= 1 else None  # members do not validate
    if validate is not None:
        out[f"validation ({validate.n_tasks} tasks)"] = validate.predicted_seconds(parts.meta)
    if cfg.get("compare"):  # its candidates' training timed, as the run's
        out.update(plan_comparison(cfg, parts, price=True, run_dir=run_dir).predicted_seconds())
    return out


def _checkpoint(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint in `run_dir` the run would resume from, or None (none, or resume=fresh over another config's:
    priced from the start, the checkpoint not moved). One made with another config is refused as the run would
    refuse it (`ResumeMismatch`)."""
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return None
    checkpoint = load_checkpoint(path)
    refusal = checkpoint_changes(cfg, checkpoint, run_dir)
    if refusal is None:
        return checkpoint
    if cfg.get("resume", "check") == "fresh":
        return None
    raise refusal


def _resumed(cfg: DictConfig, run_dir: Path) -> list[tuple[DictConfig, dict[str, Any] | None]]:
    """(config, checkpoint to resume from) of the run, or of each member of an ensemble (in run_dir/member{i}),
    read before any work."""
    if int(cfg.get("ensemble", 1)) <= 1:
        return [(cfg, _checkpoint(cfg, run_dir))]
    members = [member_config(cfg, i) for i in range(int(cfg.ensemble))]
    return [(member, _checkpoint(member, run_dir / f"member{i}")) for i, member in enumerate(members)]


def _training(cfg: DictConfig, resumed: list[tuple[DictConfig, dict[str, Any] | None]],
              step_seconds: float) -> tuple[float, int, int]:
    """(predicted training seconds, meta-steps left, meta-steps done) over what the run, or each member of an
    ensemble in turn, has left: a checkpoint's steps and `time_limit` seconds are not priced again, and members
    share what is left of `time_limit` as `train_ensemble` shares it."""
    limit = parse_seconds(cfg.time_limit) if cfg.get("time_limit") is not None else None
    seconds, steps, done, used = 0.0, 0, 0, 0.0
    for i, (member, checkpoint) in enumerate(resumed):
        if limit is not None and len(resumed) > 1:  # an equal share of what the members before it left
            with open_dict(member):  # a member's own config (`member_config`)
                member.time_limit = max((limit - used) / (len(resumed) - i), 1.0)
        left = left_to_train(member, checkpoint)
        member_seconds, member_steps = training_seconds(left, step_seconds)
        spent = float(checkpoint.get("train_seconds", 0.0)) if checkpoint else 0.0
        seconds, steps, used = seconds + member_seconds, steps + member_steps, used + spent + member_seconds
        done += int(checkpoint["meta_step"]) if checkpoint else 0
    return seconds, steps, done


def dry_run(cfg: DictConfig, run_dir: Path, launcher: DictConfig | None = None,
            started: float | None = None) -> dict[str, Any]:
    """Price the configured run without training it (see the module docstring); returns the `dry_run.json`
    record and prints a summary. `started`: the `time.perf_counter()` at which the job's clock started
    (`jobs.job_started`; default: this process's start), from which the set-up is measured."""
    started = time.perf_counter() - process_age() if started is None else started
    resumed = _resumed(cfg, run_dir)
    parts = build(cfg)
    timed = timed_steps(cfg, build(member_config(cfg, 0)) if int(cfg.get("ensemble", 1)) > 1 else parts)
    evaluations = _evaluations(cfg, parts, run_dir)
    step_seconds = float(timed["seconds_per_meta_step"])
    set_up = time.perf_counter() - started - float(timed["train_seconds"])  # all but the timed steps: a run's start
    training, steps, resumed_from = _training(cfg, resumed, step_seconds)
    after = sum(s for s in evaluations.values() if s is not None)
    record: dict[str, Any] = {
        "status": "planned", "plan": timed["plan"], "batching": timed["batching"], "chunk_size": timed["chunk_size"],
        "estimator_chosen": timed["estimator_chosen"], "predicted_peak_bytes": timed["predicted_peak_bytes"],
        "measured_peak_bytes": timed["measured_peak_bytes"], "seconds_per_meta_step": step_seconds,
        "timed_meta_steps": timed["meta_steps"], "meta_steps": steps, "resumed_from_meta_step": resumed_from,
        "predicted_train_seconds": training,
        "predicted_evaluations": evaluations, "predicted_set_up_seconds": set_up,
        "predicted_run_seconds": set_up + training + after, "config": resolved(cfg)}
    limit = job_time_limit(cfg, launcher)
    if limit is not None:
        left = limit - set_up - RESERVE_MARGIN * after - END_SECONDS
        record.update(job_time_limit=limit,
                      meta_steps_within_job_limit=max(int(left / (step_seconds * int(cfg.get("ensemble", 1)))), 0))
    write_json_atomic(record, run_dir / "dry_run.json")
    _say(record, evaluations)
    return record


def _say(record: dict[str, Any], evaluations: dict[str, float | None]) -> None:
    def seconds(value: float | None) -> str:
        return "not timed" if value is None else (f"{value:.3g} s" if value < 120 else f"{value / 60:.3g} min")
    print(f"plan: {record['estimator_chosen']}, {record['batching']}, chunks of {record['chunk_size']}, predicted "
          f"peak {format_bytes(record['predicted_peak_bytes'])} (measured "
          f"{format_bytes(max(record['measured_peak_bytes'], 0))} over {record['timed_meta_steps']} timed meta-steps)")
    start = record["resumed_from_meta_step"]
    resumed = f" (resumed from meta-step {start})" if start else ""
    print(f"training: {record['meta_steps']} meta-steps{resumed} x {record['seconds_per_meta_step']:.3g} s (the "
          f"median of {record['timed_meta_steps']}) = {seconds(record['predicted_train_seconds'])}")
    for what, value in evaluations.items():
        print(f"after training: {what}: {seconds(value)}")
    print(f"set-up (imports, data, plans): {seconds(record['predicted_set_up_seconds'])}; the whole run: "
          f"{seconds(record['predicted_run_seconds'])} (approximate)")
    if "job_time_limit" in record:
        print(f"job_time_limit {seconds(record['job_time_limit'])}: about {record['meta_steps_within_job_limit']} "
              f"meta-steps fit beside the evaluations (x{RESERVE_MARGIN:g}) and the end")
    if not math.isfinite(record["seconds_per_meta_step"]):
        log.warning("dry run: no timed meta-step finished (non-finite losses?): the training price is unknown")
