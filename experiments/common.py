"""Building library objects from a composed Hydra config (shared by the Hydra apps).

Only construction lives here: every `_target_` is a library constructor, so the
plain-Python example in README builds exactly what a config builds.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaopt import Budget, InnerLoop, losses, meta_params, meta_train
from metaopt.estimators import MetaGradientMethod
from metaopt.tasks import RandomInit, TaskDistribution
from metaopt.types import MetaParams

log = logging.getLogger("metaopt")


class Parts(NamedTuple):
    tasks: TaskDistribution
    eval_tasks: TaskDistribution
    model: torch.nn.Module
    loop: InnerLoop
    meta: MetaParams
    estimator: MetaGradientMethod
    budget: Budget


def build(cfg: DictConfig, load_tasks: bool = True) -> Parts:
    """Seed, set the dtype, and instantiate every part named by the config.

    With `load_tasks=False` the task distributions are not built (no data is read); the
    loss comes from the task's kind (`Parts.tasks` is None).
    """
    torch.manual_seed(cfg.seed)
    torch.set_default_dtype(getattr(torch, cfg.dtype))
    if load_tasks:
        tasks = instantiate(cfg.task)
        eval_tasks = instantiate(cfg.task, **cfg.eval.task) if cfg.eval.task else tasks
        loss_fn = tasks.loss_fn
    else:
        tasks = eval_tasks = None
        loss_fn = losses.cross_entropy
    model = instantiate(cfg.model).to(cfg.device)
    if cfg.get("random_init", False) and tasks is not None:
        # Every task starts from its own fresh initialization of the model (Task.init).
        tasks, eval_tasks = RandomInit(tasks, model), RandomInit(eval_tasks, model)
    meta = build_meta(cfg, model)
    loop = instantiate(cfg.loop)(model=model, optimizer=instantiate(cfg.inner_optim), loss_fn=loss_fn)
    log.info("Instantiating estimator <%s>", cfg.estimator._target_)
    estimator = instantiate(cfg.estimator)
    budget = instantiate(cfg.budget)
    log.info("tasks=%r model=%s meta=%s estimator=%r budget=%r", tasks, type(model).__name__,
             {k: type(v).__name__ for k, v in meta.items()}, estimator, budget)
    return Parts(tasks, eval_tasks, model, loop, meta, estimator, budget)


def build_meta(cfg: DictConfig, model: torch.nn.Module) -> MetaParams:
    """The meta-parameter modules of `cfg.metaparam` (slot -> partial constructor taking the model)."""
    slots = {k: v for k, v in instantiate(cfg.metaparam).items() if v is not None}
    return meta_params(*(make(model) for make in slots.values())).to(cfg.device)


def train_from_config(cfg: DictConfig, parts: Parts, run_dir: Path, *, log: Callable[[dict, int], None] | None = None,
                      evaluate: bool = True) -> dict:
    """`meta_train` with the config's settings, checkpointing in `run_dir` (resumes from it).

    With `evaluate=False` the final meta-test evaluation is skipped (the caller evaluates).
    """
    outer_optimizer = instantiate(cfg.outer_optim)(parts.meta.parameters())
    return meta_train(
        parts.loop, parts.meta, parts.estimator, parts.tasks,
        outer_optimizer=outer_optimizer, meta_steps=cfg.meta_steps, meta_batch_size=cfg.meta_batch_size,
        inner_steps=cfg.inner_steps, budget=parts.budget, batching=cfg.batching, seed=cfg.seed,
        eval_tasks=parts.eval_tasks, eval_inner_steps=cfg.eval.inner_steps,
        eval_n_tasks=cfg.eval.n_tasks if evaluate else 0, eval_batch_size=cfg.eval.batch_size,
        checkpoint_path=run_dir / "checkpoint.pt", checkpoint_every=cfg.checkpoint_every,
        log=log, log_every=cfg.log_every, progress=cfg.progress, device=cfg.device, on_nan=cfg.on_nan,
        max_grad_norm=cfg.max_grad_norm)


def make_logger(cfg: DictConfig, run_dir: Path) -> tuple[Callable[[dict, int], None] | None, Callable[[], None]]:
    """A `log(metrics, step)` callback and a `finish()` for the configured logger."""
    if cfg.logger.name == "none":
        return None, lambda: None
    if cfg.logger.name != "wandb":
        raise ValueError(f"unknown logger {cfg.logger.name!r}; use logger=none or logger=wandb")
    try:
        import wandb
    except ImportError:
        raise ImportError("logger=wandb needs wandb: pip install 'metaopt[wandb]'") from None
    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=mode, dir=str(run_dir),
                     tags=list(cfg.logger.tags), config=OmegaConf.to_container(cfg, resolve=True))
    return (lambda metrics, step: run.log(metrics, step=step)), run.finish


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write JSON through a temporary file and `os.replace`, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
