"""Clear errors before any work: configurations that cannot run, named by the config keys to change."""
from __future__ import annotations

from typing import cast

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils._pytree import tree_map_only

from metaopt.slots import DataSlot
from metaopt.tasks import TaskDistribution
from metaopt.types import Batch, MetaParams

__all__ = ["check_device_and_dtype", "check_task_fits_model", "check_data_slot_fits_model", "check_loop_classes",
           "target_name"]


def check_device_and_dtype(cfg: DictConfig) -> None:
    """Raise ValueError for a device that is not there or a dtype that cannot train on it."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device}: this machine has no CUDA device (torch {torch.__version__}, "
                         f"cuda available: False); use device=cpu")
    dtype = getattr(torch, str(cfg.dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={cfg.dtype}: not a torch floating-point dtype; use float32 or float64")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("dtype=float16 on device=cpu: half precision has too little range for second-order "
                         "meta-gradients and is not a CPU compute type (the first meta-step overflows); "
                         "use dtype=float32 (or dtype=float16 with device=cuda)")


def check_task_fits_model(cfg: DictConfig, tasks: TaskDistribution, model: torch.nn.Module) -> None:
    """Run the model on one sampled support batch; raise ValueError naming `task` and `model` if it cannot
    take the task's inputs or gives the wrong number of outputs for its classes."""
    task = tasks.sample(1, 1, torch.Generator().manual_seed(0))
    x = task.support[0].x[0].to(cfg.device)
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as error:
        raise ValueError(
            f"model={target_name(cfg.model)} cannot take the inputs of task={target_name(cfg.task)} (examples of shape "
            f"{tuple(x.shape[1:])}): {str(error).splitlines()[0]}. Change `model` (image tasks: model=conv4 with "
            f"model.image_size=${{task.size}}) or `task`") from None
    n_way = getattr(tasks, "n_way", None)
    width = out.shape[-1] if out.dim() > 1 else 1
    if tasks.kind == "classification" and cfg.loop._target_.endswith("InnerLoop") and n_way and width != n_way:
        raise ValueError(f"model={target_name(cfg.model)} has {width} outputs but task={target_name(cfg.task)} has "
                         f"{n_way} classes per task; set model.out_features=${{task.n_way}}")
    if cfg.loop._target_.endswith("ClassifierLoop"):
        if int(cfg.inner_steps) != 0:
            raise ValueError(f"loop=classifier trains a classifier with no inner step, but inner_steps="
                             f"{cfg.inner_steps}; set inner_steps=0 (evaluation's eval.inner_steps=1 makes the "
                             "prototypes)")
        classes = getattr(tasks, "num_classes", 0)
        if getattr(tasks, "global_labels", False) and width < classes:
            raise ValueError(f"model={target_name(cfg.model)} has {width} outputs but task={target_name(cfg.task)} "
                             f"labels {classes} training classes (task.global_labels=true, loop=classifier); set "
                             f"model.out_features >= {classes}")


def check_data_slot_fits_model(cfg: DictConfig, tasks: TaskDistribution, model: torch.nn.Module,
                               meta: MetaParams) -> None:
    """A data slot (a learned augmentation, synthetic data) makes the inputs the inner loop trains on: run it and the
    model on one sampled support batch; raise ValueError naming `metaparam.data`, `task` and `model` if they cannot
    (e.g. `metaparam=synthetic`, built for 8x8 digits, on the sinusoid: before, a shape error from the model's
    first layer inside the planner's first call)."""
    if "data" not in meta:
        return
    task = tasks.sample(1, 1, torch.Generator().manual_seed(0))
    support = cast(Batch, tree_map_only(Tensor, lambda v: v[0].to(cfg.device), task.support[0]))
    made = None
    device = torch.device(cfg.device)
    try:  # a random augmentation draws from torch's stream: the run's draws stay as they were
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            made = cast(DataSlot, meta["data"]).transform(support)
            model(made.x)
    except (RuntimeError, ValueError) as error:
        shapes = f"the task's support inputs have shape {tuple(support.x.shape[1:])}"
        if made is not None:
            shapes += f", the slot's {tuple(made.x.shape[1:])}"
        raise ValueError(
            f"metaparam.data={target_name(cfg.metaparam.data)} cannot serve task={target_name(cfg.task)} with "
            f"model={target_name(cfg.model)}: {shapes} ({str(error).splitlines()[0]}). Make the slot's examples the "
            "task's (e.g. metaparam.data.shape), or choose the task it is built for (metaparam=synthetic: "
            "experiment=distill_digits; metaparam=augmentation: an image task)") from None


def check_loop_classes(cfg: DictConfig, named_tasks: dict[str, TaskDistribution | None]) -> None:
    """A loop that is built for a number of classes (ProtoNets: `loop.n_way`) must cover every task
    distribution it scores; raise ValueError naming the config keys otherwise."""
    loop_ways = cfg.loop.get("n_way")
    for key, tasks in named_tasks.items():
        if getattr(tasks, "global_labels", False):  # labelled by all classes: a classifier's head answers them
            continue
        n_way = getattr(tasks, "n_way", None)
        if loop_ways is not None and n_way is not None and n_way > loop_ways:
            raise ValueError(f"loop.n_way={loop_ways} but {key} draws {n_way}-way tasks: set {key}.n_way <= "
                             f"{loop_ways} (or task.n_way >= {n_way})")


def target_name(node: DictConfig) -> str:
    """The class a config node builds, e.g. "Conv4" for `_target_: metaopt.Conv4`."""
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]
