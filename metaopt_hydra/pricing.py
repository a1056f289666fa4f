"""A config's meta-training priced before it runs: a few timed meta-steps on copies, and the steps they buy.

Shared by the dry run (`metaopt_hydra.dry_run`: the whole run's price) and a baselines comparison planned before
training (`metaopt_hydra.comparison`: each candidate's training, reserved under a job's wall-clock limit).
Approximate: the median of `TIMED_STEPS` meta-steps at the start of a run.
"""
from __future__ import annotations

import copy
from typing import Any, ContextManager, cast

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaopt import meta_train
from metaopt.budget import parse_seconds
from metaopt_hydra.build import Parts

__all__ = ["timed_steps", "training_seconds", "left_to_train", "kept_random_state", "TIMED_STEPS"]

TIMED_STEPS = 5
"""Meta-steps timed (the median is kept: the first pays one-off costs, e.g. a compilation)."""


def kept_random_state(device: str | torch.device) -> ContextManager[None]:
    """The global random state (the CPU's, and `device`'s where it is a GPU) restored on leaving: work done inside
    (a build, which seeds it; timed steps) leaves a run that follows as it would have been without it."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


def timed_steps(cfg: DictConfig, parts: Parts) -> dict[str, Any]:
    """`TIMED_STEPS` meta-steps of the config's plan on copies of its meta-parameters: `meta_train`'s metrics
    (nothing checkpointed; the global random state is left as it was, so a run priced first trains as one
    that was not)."""
    meta = copy.deepcopy(parts.meta)
    with kept_random_state(cfg.device):
        return meta_train(parts.loop, meta, parts.estimator, parts.tasks,
                          outer_optimizer=instantiate(cfg.outer_optim)(meta.parameters()),
                          meta_steps=min(TIMED_STEPS, max(int(cfg.meta_steps), 1)),
                          meta_batch_size=cfg.meta_batch_size, inner_steps=cfg.inner_steps, budget=parts.budget,
                          batching=cfg.batching, seed=cfg.seed, eval_n_tasks=0, progress=False, device=cfg.device,
                          on_nan=cfg.on_nan, max_grad_norm=cfg.max_grad_norm, log_every=TIMED_STEPS,
                          lr_schedule=instantiate(cfg.lr_schedule) if cfg.get("lr_schedule") else None,
                          prefetch=cfg.get("prefetch"), overlap=cfg.get("overlap"))


def training_seconds(cfg: DictConfig, step_seconds: float) -> tuple[float, int]:
    """(predicted training seconds, meta-steps) of the config: its meta-steps at `step_seconds`, within
    `time_limit`, for each of an ensemble's members."""
    members = int(cfg.get("ensemble", 1))
    steps = int(cfg.meta_steps)
    seconds = steps * step_seconds * members
    if cfg.get("time_limit") is not None:
        limit = parse_seconds(cfg.time_limit)
        if seconds > limit:
            steps = int(limit / (step_seconds * members))
            seconds = steps * step_seconds * members
    return seconds, steps * members


def left_to_train(cfg: DictConfig, checkpoint: dict[str, Any] | None) -> DictConfig:
    """`cfg` with the meta-steps (and `time_limit`) that `checkpoint` (a loaded one; None: a fresh start) has not
    used yet: what a resumed session trains."""
    if checkpoint is None:
        return cfg
    left = cast(DictConfig, OmegaConf.create(OmegaConf.to_container(cfg)))
    left.meta_steps = max(int(cfg.meta_steps) - int(checkpoint["meta_step"]), 0)
    if cfg.get("time_limit") is not None:
        left.time_limit = max(parse_seconds(cfg.time_limit) - float(checkpoint.get("train_seconds", 0.0)), 1e-9)
    return left
