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
with the reason instead of failing the run.
"""
from __future__ import annotations

import logging
from typing import Any, cast

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaopt import evaluate
from metaopt.prototypes import ClassAware
from metaopt.tasks import RandomInit
from metaopt_hydra.build import Parts, data_error, eval_batching
from metaopt_hydra.checks import check_task_fits_model

__all__ = ["evaluate_protocols", "SCORES"]

log = logging.getLogger("metaopt")

SCORES = ("meta_test_loss", "meta_test_loss_ci95", "test_accuracy", "test_accuracy_ci95")


def evaluate_protocols(cfg: DictConfig, parts: Parts) -> dict[str, dict[str, Any]]:
    """{name: {"task": repr, meta_test_loss, ..., test_accuracy_ci95} or {"task", "skipped": reason}}
    for every entry of `eval.protocols` ({} when there is none)."""
    out: dict[str, dict[str, Any]] = {}
    for name, overrides in (cfg.eval.get("protocols") or {}).items():
        if cfg.eval.n_tasks <= 0:
            out[name] = {"task": str(OmegaConf.to_container(overrides)), "skipped": "eval.n_tasks=0"}
            continue
        settings: dict[str, Any] = {**cast(dict, OmegaConf.to_container(cfg.eval.task or {})),
                                    **cast(dict, OmegaConf.to_container(overrides))}
        try:
            tasks = instantiate(cfg.task, **settings)
        except Exception as error:  # the data's own error (e.g. no alphabet with 20 characters), wrapped by Hydra
            cause = data_error(error)
            out[name] = {"task": str(settings), "skipped": f"{type(cause).__name__}: {cause}"}
            log.warning("protocol %s skipped: its tasks cannot be built: %s", name, out[name]["skipped"])
            continue
        try:
            check_task_fits_model(cfg, tasks, parts.model)
        except ValueError as error:
            out[name] = {"task": repr(tasks), "skipped": str(error)}
            log.warning("protocol %s skipped: %s", name, error)
            continue
        loop = parts.loop
        if isinstance(loop, ClassAware):  # a loop that knows its number of classes answers the protocol's
            loop = loop.with_n_way(tasks.n_way)
        if cfg.get("random_init", False):
            tasks = RandomInit(tasks, parts.model)
        scores = evaluate(loop, parts.meta, tasks, n_tasks=cfg.eval.n_tasks, inner_steps=cfg.eval.inner_steps,
                          batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, batching=eval_batching(cfg),
                          device=cfg.device, budget=parts.budget)
        out[name] = {"task": repr(tasks), **{k: float(scores[k]) for k in SCORES if k in scores}}
        log.info("protocol %s: %s", name, {k: round(v, 4) for k, v in out[name].items() if isinstance(v, float)})
    return out
