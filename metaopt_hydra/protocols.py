"""Further meta-test protocols, evaluated after training beside the main meta-test.

`eval.protocols` maps a name to overrides of `task` (on top of `eval.task`), e.g. Lake et
al.'s within-alphabet 20-way one-shot runs on Omniglot:

    eval:
      protocols:
        within_alphabet_20way: {n_way: 20, within_alphabet: true, drawer_split: true, rotations: false}

Each protocol is scored on `eval.n_tasks` tasks with the same seed and inner steps as the
meta-test. A loop with its own number of classes (`ClassAware`: ProtoNets, Proto-MAML, their
ensembles) answers the protocol's (`with_n_way`). A protocol the data cannot form (no held-out alphabet with 20
characters) or the model cannot answer (a 5-way MAML head on a 20-way protocol) is recorded as skipped
with the reason instead of failing the run. Protocols are planned before training (`plan_protocols`: their
plans and predicted seconds in the log before any work, reserved where the run has a wall-clock deadline) and
evaluated after it with those plans.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaopt import InnerLoop, evaluate
from metaopt.deadline import Deadline
from metaopt.evaluation import EvalPlan
from metaopt.prototypes import ClassAware
from metaopt.tasks import RandomInit, TaskDistribution
from metaopt_hydra.build import Parts, data_error, plan_config_evaluation
from metaopt_hydra.checks import check_task_fits_model

__all__ = ["plan_protocols", "evaluate_protocols", "PlannedProtocol", "SCORES"]

log = logging.getLogger("metaopt")

SCORES = ("meta_test_loss", "meta_test_loss_ci95", "test_accuracy", "test_accuracy_ci95")


@dataclass(frozen=True)
class PlannedProtocol:
    """A protocol as planned before training: its tasks and evaluation plan, or the record of why it is skipped."""

    name: str
    record: dict[str, Any]  # {"task": repr} (+ "skipped": reason)
    tasks: TaskDistribution | None = None
    plan: EvalPlan | None = None


def _protocol_loop(parts: Parts, tasks: TaskDistribution) -> InnerLoop:
    """The loop that answers `tasks`: one that knows its number of classes answers the protocol's."""
    return parts.loop.with_n_way(cast(Any, tasks).n_way) if isinstance(parts.loop, ClassAware) else parts.loop


def plan_protocols(cfg: DictConfig, parts: Parts, deadline: Deadline | None = None) -> list[PlannedProtocol]:
    """Every entry of `eval.protocols`, its tasks built and checked and its evaluation planned (before training:
    the plan and predicted seconds are in the log, and reserved in `deadline`); a protocol the data cannot form or
    the model cannot answer is planned as skipped. `parts`: the run's, untrained (an ensemble's as `build` makes it:
    the members' shapes and cost; a plan holds sizes and timings, not weights)."""
    out: list[PlannedProtocol] = []
    for name, overrides in (cfg.eval.get("protocols") or {}).items():
        if cfg.eval.n_tasks <= 0:
            out.append(PlannedProtocol(name, {"task": str(OmegaConf.to_container(overrides)),
                                              "skipped": "eval.n_tasks=0"}))
            continue
        base = cast(dict, OmegaConf.to_container(cfg.eval.task)) if cfg.eval.get("task") else {}  # {} is falsy
        settings: dict[str, Any] = {**base, **cast(dict, OmegaConf.to_container(overrides))}
        try:
            tasks = instantiate(cfg.task, **settings)
        except Exception as error:  # the data's own error (e.g. no alphabet with 20 characters), wrapped by Hydra
            cause = data_error(error)
            out.append(PlannedProtocol(name, {"task": str(settings), "skipped": f"{type(cause).__name__}: {cause}"}))
            log.warning("protocol %s skipped: its tasks cannot be built: %s", name, out[-1].record["skipped"])
            continue
        try:
            check_task_fits_model(cfg, tasks, parts.model)
        except ValueError as error:
            out.append(PlannedProtocol(name, {"task": repr(tasks), "skipped": str(error)}))
            log.warning("protocol %s skipped: %s", name, error)
            continue
        if cfg.get("random_init", False):
            tasks = RandomInit(tasks, parts.model)
        plan = plan_config_evaluation(cfg, parts, tasks, f"protocol {name}", cfg.eval.n_tasks,
                                      loop=_protocol_loop(parts, tasks), deadline=deadline)
        out.append(PlannedProtocol(name, {"task": repr(tasks)}, tasks, plan))
    return out


def evaluate_protocols(cfg: DictConfig, parts: Parts,
                       planned: list[PlannedProtocol] | None = None) -> dict[str, dict[str, Any]]:
    """{name: {"task": repr, meta_test_loss, ..., test_accuracy_ci95} or {"task", "skipped": reason}}
    for every entry of `eval.protocols` ({} when there is none), as `planned` (default: planned now)."""
    out: dict[str, dict[str, Any]] = {}
    for protocol in planned if planned is not None else plan_protocols(cfg, parts):
        if protocol.tasks is None:
            out[protocol.name] = protocol.record
            continue
        scores = evaluate(_protocol_loop(parts, protocol.tasks), parts.meta, protocol.tasks,
                          n_tasks=cfg.eval.n_tasks, inner_steps=cfg.eval.inner_steps, batch_size=cfg.eval.batch_size,
                          seed=cfg.eval.seed, device=cfg.device, budget=parts.budget, plan=protocol.plan)
        out[protocol.name] = {**protocol.record, **{k: float(scores[k]) for k in SCORES if k in scores}}
        log.info("protocol %s: %s", protocol.name,
                 {k: round(v, 4) for k, v in out[protocol.name].items() if isinstance(v, float)})
    return out
