"""Batches of tasks: stack equal-shaped tasks for `torch.func.vmap`, or loop.

A batch of tasks is a `Task` whose tensors carry a leading task axis of size B.
Tasks with different shapes cannot be stacked; they run one after another.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Literal, Sequence, cast

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_map_only, tree_unflatten

from metaopt.types import Batch, Task

__all__ = ["Batching", "Batched", "TaskShapeMismatch", "stack_tasks", "unstack_tasks", "task_count",
           "check_task", "resolve_batching", "compress_support", "expand_support", "vmap_tasks"]

Batching = Literal["auto", "stacked", "vmap", "loop"]
"""How a batch of tasks runs: "stacked" (one graph on the task axis, metaopt's stacked layers:
`metaopt.stacked`), "vmap" (one graph, `torch.func.vmap` of the per-task function), "loop" (task by task),
or "auto" (stacked, else vmap, else loop: the first that the tasks, the estimator and the model allow)."""

Batched = Literal["stacked", "vmap"]
"""The modes that run a chunk of tasks as one graph."""


class TaskShapeMismatch(ValueError):
    """Tasks (or the batches inside one task) have shapes that do not go together."""


def _describe(task: Task) -> list[tuple[str, tuple[int, ...]]]:
    names = [f"support[{t}].{f}" for t in range(len(task.support)) for f in Batch._fields]
    names += [f"query.{f}" for f in Batch._fields]
    leaves, _ = tree_flatten(task)
    return [(n, tuple(v.shape)) for n, v in zip(names, leaves)]


def check_task(task: Task, *, batched: bool = False) -> None:
    """Check that a task's support and query batches go together.

    Inputs must have the same per-example shape in every batch, and each batch as
    many targets as inputs. With `batched`, every tensor has the same leading
    task axis.

    Raises:
      TaskShapeMismatch: naming the batch and the shapes.
    """
    lead = 1 if batched else 0
    batches = (*task.support, task.query)
    # The common case costs a few comparisons per call (this runs every meta-step); names only on failure.
    ref = task.query.x.shape[lead + 1:]
    n = task.query.x.shape[0]
    if any((batched and (b.x.shape[0] != n or b.y.shape[0] != n)) or b.x.shape[lead + 1:] != ref
           or b.x.shape[:lead + 1] != b.y.shape[:lead + 1] for b in batches):
        _raise_mismatch(task, lead)


def _raise_mismatch(task: Task, lead: int) -> None:
    """Raise `check_task`'s TaskShapeMismatch for the first batch that does not go with the others."""
    batches = [(f"support[{t}]", b) for t, b in enumerate(task.support)] + [("query", task.query)]
    if lead:
        sizes = {name: b.x.shape[0] for name, b in batches} | {name + ".y": b.y.shape[0] for name, b in batches}
        if len(set(sizes.values())) > 1:
            raise TaskShapeMismatch(f"batched task has different task-axis sizes: {sizes}")
    ref_name, ref = batches[-1]
    for name, b in batches:
        if b.x.shape[lead + 1:] != ref.x.shape[lead + 1:]:
            raise TaskShapeMismatch(
                f"task inputs differ in shape: {name}.x has examples of shape {tuple(b.x.shape[lead + 1:])}, "
                f"{ref_name}.x of shape {tuple(ref.x.shape[lead + 1:])}")
        if b.x.shape[:lead + 1] != b.y.shape[:lead + 1]:
            raise TaskShapeMismatch(f"{name} has {tuple(b.x.shape[:lead + 1])} inputs but "
                                    f"{tuple(b.y.shape[:lead + 1])} targets")


def stack_tasks(tasks: Sequence[Task]) -> Task:
    """Stack tasks of equal shapes along a new leading task axis.

    Raises:
      TaskShapeMismatch: the tasks differ in inner steps or in some tensor's shape
        (the message names the task, the tensor and both shapes).
    """
    if not tasks:
        raise ValueError("stack_tasks: no tasks given")
    ref = _describe(tasks[0])
    for i, task in enumerate(tasks[1:], start=1):
        if len(task.support) != len(tasks[0].support):
            raise TaskShapeMismatch(f"cannot stack tasks: task {i} has {len(task.support)} inner steps, "
                                    f"task 0 has {len(tasks[0].support)}")
        for (name, shape), (_, ref_shape) in zip(_describe(task), ref):
            if shape != ref_shape:
                raise TaskShapeMismatch(f"cannot stack tasks for vmap: task {i} {name} has shape {shape}, "
                                        f"task 0 has {ref_shape} (use batching='loop' for unequal tasks)")
    leaves = [tree_flatten(t)[0] for t in tasks]
    _, spec = tree_flatten(tasks[0])
    # A support batch repeated over inner steps is one object: stack it once, not once per step.
    stacked: dict[tuple[int, ...], torch.Tensor] = {}
    out: list[torch.Tensor | None] = []
    for column in zip(*leaves):
        if column[0] is None:  # no Task.init
            out.append(None)
            continue
        key = tuple(id(v) for v in column)
        if key not in stacked:
            stacked[key] = torch.stack(column)
        out.append(stacked[key])
    return tree_unflatten(out, spec)


def task_count(tasks: Task) -> int:
    """B, the size of the leading task axis of a batch of tasks."""
    return tasks.query.x.shape[0]


def unstack_tasks(tasks: Task) -> list[Task]:
    """The B tasks of a batch of tasks, each without the task axis."""
    return [_shared_map(functools.partial(_index, i=i), tasks) for i in range(task_count(tasks))]


def _index(v: torch.Tensor, i: int) -> torch.Tensor:
    return v[i]


def _shared_map(fn: Callable[[torch.Tensor], torch.Tensor], task: Task) -> Task:
    """tree_map that maps a tensor appearing several times (a repeated support batch) only once."""
    done: dict[int, torch.Tensor] = {}

    def once(v: torch.Tensor) -> torch.Tensor:
        if id(v) not in done:
            done[id(v)] = fn(v)
        return done[id(v)]

    return tree_map_only(torch.Tensor, once, task)  # a task without init has a None leaf


def compress_support(task: Task) -> tuple[Task, tuple[int, ...]]:
    """The task with each distinct support batch once, and the step -> batch index pattern.

    vmap wraps every input leaf separately, so a support batch repeated T times would
    become 2T wrappers; passing the distinct batches and `expand_support` inside keeps
    memory O(1) in T for MAML-style tasks.
    """
    unique: dict[tuple[int, ...], int] = {}
    batches: list[Batch] = []
    pattern = []
    for batch in task.support:
        key = tuple(id(v) for v in batch)  # the tensors, not the tuple: unstacking rebuilds tuples
        if key not in unique:
            unique[key] = len(batches)
            batches.append(batch)
        pattern.append(unique[key])
    return task._replace(support=tuple(batches)), tuple(pattern)


def expand_support(task: Task, pattern: tuple[int, ...]) -> Task:
    """Inverse of `compress_support`."""
    return task._replace(support=tuple(task.support[i] for i in pattern))


def resolve_batching(tasks: Task | Sequence[Task], batching: Batching, vmap_blocker: str | None = None,
                     stacked_blocker: str | None = "stacked batching was not offered",
                     stacked_slower: str | None = None) -> tuple[Literal["stacked", "vmap", "loop"], Task | list[Task]]:
    """Decide how a batch of tasks runs, and put the tasks in that form.

    Args:
      tasks: a stacked batch of tasks (a `Task` with a leading task axis) or a list of tasks.
      batching: "stacked" or "vmap" (stack, raise if shapes differ or something blocks it), "loop", or
        "auto" (stacked, else vmap, where the tasks stack and nothing blocks it; loop otherwise).
      vmap_blocker: why the computation must not run under vmap, or None if it may.
      stacked_blocker: why it cannot run stacked (`metaopt.stacked`), or None if it may.
      stacked_slower: why stacked is expected slower than vmap (then "auto" vmaps where it may), or None.

    Returns:
      ("stacked" or "vmap", stacked task) or ("loop", list of tasks).

    Raises:
      ValueError: "stacked" or "vmap" with a blocker (the message says why), or an unknown mode.
      TaskShapeMismatch: "stacked" or "vmap" and the tasks do not stack.
    """
    if batching not in ("auto", "stacked", "vmap", "loop"):
        raise ValueError(f"batching must be 'auto', 'stacked', 'vmap' or 'loop', got {batching!r}")
    if batching == "vmap" and vmap_blocker is not None:
        raise ValueError(f"batching='vmap' was asked for, but {vmap_blocker}; use batching='loop' or 'auto'")
    if batching == "stacked" and stacked_blocker is not None:
        raise ValueError(f"batching='stacked' was asked for, but {stacked_blocker}; use batching='vmap', 'loop' "
                         "or 'auto'")
    batched: Batched | None = None
    if batching in ("stacked", "vmap"):
        batched = cast(Batched, batching)
    elif batching == "auto":
        if stacked_blocker is None and (stacked_slower is None or vmap_blocker is not None):
            batched = "stacked"
        else:
            batched = "vmap" if vmap_blocker is None else None
    if isinstance(tasks, Task):
        check_task(tasks, batched=True)
        if batched is None:
            return "loop", unstack_tasks(tasks)
        return batched, tasks
    tasks = list(tasks)
    for i, task in enumerate(tasks):
        try:
            check_task(task)
        except TaskShapeMismatch as e:
            raise TaskShapeMismatch(f"task {i}: {e}") from None
    if batched is None:
        return "loop", tasks
    try:
        return batched, stack_tasks(tasks)
    except TaskShapeMismatch:
        if batching != "auto":
            raise
        return "loop", tasks


def vmap_tasks(fn: Callable[[Task], Any], tasks: Task, pattern: tuple[int, ...]) -> Any:
    """`fn` over each task of a compressed batch of tasks (`compress_support`), in one vmapped graph.

    Each task draws its own random numbers (randomness="different"); a field that is
    None (no `Task.init`) is not mapped.
    """
    in_dims = (tree_map(lambda v: None if v is None else 0, tasks),)
    return torch.func.vmap(lambda t: fn(expand_support(t, pattern)), in_dims=in_dims, randomness="different")(tasks)
