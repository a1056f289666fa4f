"""Building library objects from a composed Hydra config (shared by the Hydra apps).

Only construction lives here: every `_target_` is a library constructor, so the
plain-Python example in README builds exactly what a config builds.
"""
from __future__ import annotations

import copy
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple, cast

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, open_dict

from metaopt import Budget, InnerLoop, evaluate, losses, meta_params, meta_train
from metaopt.callbacks import Callback, Validation
from metaopt.batching import Batching
from metaopt.budget import parse_seconds
from metaopt.compiled import Compiled
from metaopt.deadline import Deadline
from metaopt.ensemble import ProtoNetEnsemble, ensemble_meta
from metaopt.estimators import AbstractEstimator, MetaGradientMethod
from metaopt.evaluation import EvalPlan, plan_ahead
from metaopt.loop import adapt_patterns
from metaopt.online import OnlineTasks
from metaopt.tasks import RandomInit, TaskDistribution
from metaopt.tasks.base import EmptySplit
from metaopt.types import MetaParams
from metaopt_hydra.checks import (
    check_data_slot_fits_model,
    check_device_and_dtype,
    check_loop_classes,
    check_task_fits_model,
    target_name,
)

log = logging.getLogger("metaopt")


class Parts(NamedTuple):
    """What a config builds. `tasks`: meta-training; `val_tasks`: validation (never the meta-test tasks:
    another seed, and `eval.val_task` overrides such as a validation split); `eval_tasks`: meta-test, None
    where the data has no such split (`EmptySplit`, e.g. Omniglot's background split without the evaluation
    set): the run then trains, skips the meta-test and records `meta_test_skipped` (the reason)."""

    tasks: TaskDistribution
    eval_tasks: TaskDistribution | None
    model: torch.nn.Module
    loop: InnerLoop
    meta: MetaParams
    estimator: MetaGradientMethod
    budget: Budget
    val_tasks: TaskDistribution | None = None
    meta_test_skipped: str | None = None


def build(cfg: DictConfig, load_tasks: bool = True) -> Parts:
    """Check, seed, set the dtype, and instantiate every part named by the config.

    With `load_tasks=False` the task distributions are not built (no data is read); the
    loss comes from the task's kind (`Parts.tasks` is None).

    Raises:
      ValueError: a dtype/device combination that cannot work, or a task the model cannot take
        (naming the config keys to change), before any training.
    """
    check_device_and_dtype(cfg)
    torch.manual_seed(cfg.seed)
    torch.set_default_dtype(getattr(torch, cfg.dtype))
    budget = instantiate(cfg.budget)  # a bad budget fails here, before data is read
    eval_tasks: TaskDistribution | None
    val_tasks: TaskDistribution | None
    if load_tasks:
        tasks = instantiate(cfg.task)
        eval_tasks, skipped = _meta_test_tasks(cfg, tasks)
        val_tasks = _validation_tasks(cfg, tasks)
        loss_fn = tasks.loss_fn
    else:
        tasks = eval_tasks = val_tasks = skipped = None
        loss_fn = losses.cross_entropy
    model = instantiate(cfg.model).to(cfg.device)
    if tasks is not None:
        check_task_fits_model(cfg, tasks, model)
        check_loop_classes(cfg, {"task": tasks, "eval.task": eval_tasks, "eval.val_task": val_tasks})
    drawn = tasks  # as drawn, before the wrappers below
    if cfg.get("random_init", False) and tasks is not None:
        # Every task starts from its own fresh initialization of the model (Task.init).
        tasks = RandomInit(tasks, model)
        eval_tasks = RandomInit(eval_tasks, model) if eval_tasks is not None else None
        val_tasks = RandomInit(val_tasks, model) if val_tasks is not None else None
    if cfg.get("online_horizon") and tasks is not None:
        tasks = OnlineTasks(tasks, int(cfg.online_horizon))  # training only: evaluation draws whole unrolls
    meta = build_meta(cfg, model)
    if drawn is not None:
        check_data_slot_fits_model(cfg, drawn, model, meta)
    loop = instantiate(cfg.loop)(model=model, optimizer=instantiate(cfg.inner_optim), loss_fn=loss_fn)
    if cfg.get("adapt") is not None and getattr(loop, "adapt", None) is None:
        raise ValueError(f"adapt={list(adapt_patterns(cfg.adapt) or [])}: loop={target_name(cfg.loop)} takes no inner "
                         "gradient steps to restrict; adapt applies to loop=gradient or loop=protomaml")
    if int(cfg.get("ensemble", 1)) > 1:  # members 1.. as built alone (their own seeds); trained or loaded later
        others = [build(member_config(cfg, i), load_tasks=False) for i in range(1, int(cfg.ensemble))]
        members = [(loop, meta), *((other.loop, other.meta) for other in others)]
        loop, meta = ProtoNetEnsemble(members), ensemble_meta([m for _, m in members])  # type: ignore[arg-type]
    log.info("Instantiating estimator <%s>", cfg.estimator._target_)
    estimator = compiled_if_asked(cfg, instantiate_estimator(cfg))
    log.info("tasks=%r model=%s meta=%s estimator=%r budget=%r", tasks, type(model).__name__,
             {k: type(v).__name__ for k, v in meta.items()}, estimator, budget)
    return Parts(tasks, eval_tasks, model, loop, meta, estimator, budget, val_tasks, skipped)


def instantiate_estimator(cfg: DictConfig) -> MetaGradientMethod:
    """`cfg.estimator` built. A key the chosen estimator does not take is a ValueError that names it and how to drop
    it: an experiment written for one estimator sets its keys in the estimator package, and choosing another keeps
    them (`experiment=learned_optimizer_online estimator=auto` kept online_pes's `population`, and Hydra said
    `Auto.__init__() got an unexpected keyword argument 'population'`). Checked against the constructor's
    signature before building."""
    parameters = inspect.signature(get_object(cfg.estimator._target_)).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        for key in cfg.estimator:
            if not str(key).startswith("_") and key not in parameters:
                raise ValueError(f"estimator={target_name(cfg.estimator)} takes no `{key}` (estimator.{key}="
                                 f"{cfg.estimator[key]!r}: the config sets it for another estimator, e.g. an "
                                 f"experiment's); drop it with ~estimator.{key}, or choose the estimator the config "
                                 "was written for")
    return cast(MetaGradientMethod, instantiate(cfg.estimator))


def member_config(cfg: DictConfig, i: int) -> DictConfig:
    """Member i of an ensemble run (`ensemble: K`): the run's config with seed `seed + i` and one member, which is
    the config of the standalone run the member equals."""
    member = copy.deepcopy(cfg)
    with open_dict(member):
        member.seed, member.ensemble = int(cfg.seed) + i, 1
    return member


def compiled_if_asked(cfg: DictConfig, estimator: MetaGradientMethod) -> MetaGradientMethod:
    """The estimator wrapped in `metaopt.compiled.Compiled` when `compile: true` (or `auto`: compiled only where the
    run is long enough and compiled is measured faster, `metaopt.compile_choice`), in torch.compile's
    `compile_mode` (null: the default; "reduce-overhead": CUDA graphs) and `compile_backend` ("inductor";
    "cudagraphs": eager's kernels under CUDA graphs); a planning policy such as `auto` stays eager
    (`compile_record` says why)."""
    asked = cfg.get("compile", False)
    if asked not in (True, False, "auto"):
        raise ValueError(f"compile = {asked!r}: use true, false or auto (compile where it pays)")
    if asked and isinstance(estimator, AbstractEstimator):
        return cast(MetaGradientMethod, Compiled(estimator, mode=cfg.get("compile_mode"),
                                                 backend=cfg.get("compile_backend") or "inductor",
                                                 choose=asked == "auto"))
    return estimator


def compile_record(cfg: DictConfig, estimator: MetaGradientMethod, metrics: dict[str, Any]) -> dict[str, Any]:
    """For metrics.json: "compiled" (whether the meta-gradients ran compiled), and with `compile: true` or `auto`
    "compile_seconds" (planning's compilation included) and, where it ran eager, "compile_fallback_reason";
    with `auto`, "compile_choice" ("compiled" or "eager": the plan's reason says why)."""
    if not cfg.get("compile", False):
        return {"compiled": False}
    if not isinstance(estimator, Compiled):
        return {"compiled": False, "compile_fallback_reason": f"estimator {estimator.name!r} is a planning policy: "
                "compile an estimator (e.g. estimator=full)"}
    chosen = not estimator.choose or str(metrics.get("estimator_config", "")).startswith("compiled(")
    record: dict[str, Any] = {"compiled": chosen and estimator.compiled and estimator.compiled_calls > 0,
                              "compile_seconds": estimator.compile_seconds}
    if estimator.choose:
        record["compile_choice"] = "compiled" if chosen else "eager"
    if not record["compiled"]:
        record["compile_fallback_reason"] = estimator.fallback_reason or (
            "no meta-gradient was computed" if chosen else "compile: auto chose eager (the plan says why)")
    return record


def data_error(error: BaseException) -> BaseException:
    """The task's own error (e.g. OmniglotDataError) behind `instantiate`'s: Hydra's InstantiationException
    wraps it as its cause."""
    return error.__cause__ or error


def _meta_test_tasks(cfg: DictConfig, tasks: TaskDistribution) -> tuple[TaskDistribution | None, str | None]:
    """`task` with `eval.task`'s overrides (the training distribution without any), or (None, why) where the
    data holds no such split (`EmptySplit`) or `eval.n_tasks` is 0; any other error propagates. A comparison (`compare:`) needs the
    meta-test tasks: it raises ValueError then, before training."""
    n_tasks = int(cfg.eval.n_tasks)
    if n_tasks < 0:
        raise ValueError(f"eval.n_tasks must be >= 0 (0: no meta-test), got {n_tasks}")
    if n_tasks == 0:
        if cfg.get("compare"):
            raise ValueError("compare: needs meta-test tasks, and eval.n_tasks=0 asks for none")
        return None, "eval.n_tasks=0: no meta-test asked for"
    if not cfg.eval.task:
        return tasks, None
    try:
        return instantiate(cfg.task, **cfg.eval.task), None
    except Exception as error:
        cause = data_error(error)
        if not isinstance(cause, EmptySplit):
            raise
        if cfg.get("compare"):
            raise ValueError(f"compare: needs meta-test tasks, and eval.task cannot be built: {cause}") from cause
        log.warning("meta-test skipped (training goes on): %s", cause)
        return None, str(cause)


def _validation_tasks(cfg: DictConfig, tasks: TaskDistribution) -> TaskDistribution:
    """`task` with `eval.val_task`'s overrides (e.g. a validation split); where those cannot be built (a
    split with no classes, e.g. task.val_alphabets=0), the training split with the other overrides (no training
    augmentation, evaluation labels: another seed than training's), or failing that the training distribution;
    said in the log."""
    overrides = dict(cfg.eval.get("val_task") or {})
    if not overrides:
        return tasks
    try:
        return instantiate(cfg.task, **overrides)
    except Exception as error:  # the data's own error, e.g. OmniglotDataError
        cause = data_error(error)
        why = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    others = {k: v for k, v in overrides.items() if k != "split"}
    try:
        fallback = instantiate(cfg.task, **others)
        log.warning("validation tasks from the training split with eval.val_task's other settings %s (another "
                    "seed): eval.val_task=%s cannot be built (%s)", others, overrides, why)
        return fallback
    except Exception:
        log.warning("validation tasks from the training distribution (another seed): eval.val_task=%s cannot be "
                    "built (%s)", overrides, why)
        return tasks


def build_meta(cfg: DictConfig, model: torch.nn.Module) -> MetaParams:
    """The meta-parameter modules of `cfg.metaparam` (slot -> partial constructor taking the model)."""
    slots = {k: v for k, v in instantiate(cfg.metaparam).items() if v is not None}
    return meta_params(*(make(model) for make in slots.values())).to(cfg.device)


def eval_batching(cfg: DictConfig) -> Batching:
    """The batching evaluation runs with: `eval.batching`, or training's `batching` where that is null."""
    return cast(Batching, cfg.eval.get("batching") or cfg.batching)


def plan_config_evaluation(cfg: DictConfig, parts: Parts, tasks: TaskDistribution, what: str, n_tasks: int, *,
                           loop: InnerLoop | None = None, deadline: Deadline | None = None,
                           inner_steps: int | None = None) -> EvalPlan:
    """`plan_ahead` with the config's evaluation settings (eval.inner_steps or `inner_steps`, eval.batch_size,
    `eval_batching`, device) for `n_tasks` of `tasks`, with the parts' loop (or `loop`), meta-parameters and
    budget."""
    return plan_ahead(what, loop or parts.loop, parts.meta, tasks, parts.budget, n_tasks, deadline=deadline,
                      inner_steps=cfg.eval.inner_steps if inner_steps is None else inner_steps,
                      batch_size=cfg.eval.batch_size, batching=eval_batching(cfg), device=cfg.device)


class Validator:
    """`validator(meta) -> {"val_loss", ["val_accuracy"]}` on `n_tasks` validation tasks (seed eval.seed + 1, so
    never the meta-test tasks), planned once (`plan_evaluation`, at the first call or the first
    `predicted_seconds`) and run with that plan after."""

    def __init__(self, cfg: DictConfig, parts: Parts, tasks: TaskDistribution, n_tasks: int):
        self.cfg, self.parts, self.tasks, self.n_tasks = cfg, parts, tasks, n_tasks
        self.plan: EvalPlan | None = None

    def _planned(self, meta: MetaParams) -> EvalPlan:
        if self.plan is None:
            self.plan = plan_config_evaluation(self.cfg, self.parts._replace(meta=meta), self.tasks, "validation",
                                               self.n_tasks)
        return self.plan

    def predicted_seconds(self, meta: MetaParams) -> float | None:
        """Predicted seconds of one validation (approximate; None: not timed)."""
        return self._planned(meta).predicted_seconds(self.n_tasks)

    def __call__(self, meta: MetaParams) -> dict[str, float]:
        cfg = self.cfg
        scores = evaluate(self.parts.loop, meta, self.tasks, n_tasks=self.n_tasks, inner_steps=cfg.eval.inner_steps,
                          batch_size=cfg.eval.batch_size, seed=cfg.eval.seed + 1, device=cfg.device,
                          budget=self.parts.budget, plan=self._planned(meta))
        out = {"val_loss": scores["meta_test_loss"]}
        if "test_accuracy" in scores:
            out["val_accuracy"] = scores["test_accuracy"]
        return out


def validation(cfg: DictConfig, parts: Parts) -> Validator | None:
    """The run's `Validator` on `eval.val_n_tasks` validation tasks, or None when `eval.val_n_tasks` is 0."""
    n_tasks = int(cfg.eval.get("val_n_tasks", 0) or 0)
    if n_tasks <= 0 or parts.val_tasks is None:
        return None
    return Validator(cfg, parts, parts.val_tasks, n_tasks)


def callbacks(cfg: DictConfig, parts: Parts, evaluate: bool = True) -> list[Callback]:
    """The run's `meta_train` callbacks: validation (`eval.val_every`; only when the run evaluates), then the
    collapse guard (`collapse:`), which sees the entry after validation joined it."""
    out: list[Callback] = []
    validate = validation(cfg, parts) if evaluate else None
    if validate is not None:
        out.append(Validation(validate, int(cfg.eval.get("val_every", 0) or 0)))
    if cfg.get("collapse"):
        out.append(instantiate(cfg.collapse))
    return out


def train_from_config(cfg: DictConfig, parts: Parts, run_dir: Path, *, log: Callable[[dict, int], None] | None = None,
                      evaluate: bool = True, checkpoint_extra: dict[str, Any] | None = None,
                      deadline: Deadline | None = None) -> dict:
    """`meta_train` with the config's settings, checkpointing in `run_dir` (resumes from it).

    With `evaluate=False` the final meta-test evaluation is skipped (the caller evaluates). `deadline`: the
    session's wall-clock limit (`metaopt.deadline`; `metaopt_hydra.jobs`).
    """
    outer_optimizer = instantiate(cfg.outer_optim)(parts.meta.parameters())
    return meta_train(
        parts.loop, parts.meta, parts.estimator, parts.tasks,
        outer_optimizer=outer_optimizer, meta_steps=cfg.meta_steps, meta_batch_size=cfg.meta_batch_size,
        inner_steps=cfg.inner_steps, budget=parts.budget, batching=cfg.batching, seed=cfg.seed,
        eval_tasks=parts.eval_tasks, eval_inner_steps=cfg.eval.inner_steps,
        eval_n_tasks=cfg.eval.n_tasks if evaluate and parts.eval_tasks is not None else 0,
        eval_batch_size=cfg.eval.batch_size, eval_batching=eval_batching(cfg),
        checkpoint_path=run_dir / "checkpoint.pt", checkpoint_every=cfg.checkpoint_every,
        log=log, log_every=cfg.log_every, progress=cfg.progress, device=cfg.device, on_nan=cfg.on_nan,
        max_grad_norm=cfg.max_grad_norm, checkpoint_extra=checkpoint_extra, callbacks=callbacks(cfg, parts, evaluate),
        lr_schedule=instantiate(cfg.lr_schedule) if cfg.get("lr_schedule") else None,
        time_limit=parse_seconds(cfg.time_limit) if cfg.get("time_limit") is not None else None,
        prefetch=cfg.get("prefetch"), overlap=cfg.get("overlap"), deadline=deadline)
