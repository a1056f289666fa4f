"""Pricing explorer trials with the planner, and running them in worker processes."""
from __future__ import annotations

import logging
import multiprocessing
import time
from pathlib import Path
from typing import Any, Callable, cast

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaopt import Auto, Budget, BudgetExceeded
from metaopt.allocator import ALLOCATORS
from metaopt.estimators import AbstractEstimator
from metaopt.explore.queue import Candidate
from metaopt.explore.scheduler import Message, Price
from metaopt.planning import describe, plan
from metaopt.train import optimizer_state_bytes, task_to
from metaopt.types import MetaParams
from metaopt_hydra.build import build
from metaopt_hydra.explore.worker import worker_main

__all__ = ["ProcessRunner", "estimator_node"]

log = logging.getLogger("metaopt")


class _Ladder(Auto):
    """`auto`'s ranked candidates less the estimators whose prediction a trial's guard caught too low."""

    def __init__(self, excluded: list[str]):
        super().__init__()
        self.excluded = excluded

    def candidates(self, loop: Any, meta: MetaParams, steps: int) -> list[AbstractEstimator]:
        return [c for c in super().candidates(loop, meta, steps) if describe(c) not in self.excluded]


def estimator_node(estimator: AbstractEstimator) -> dict[str, Any]:
    """The config node that builds `estimator`: its class and its constructor's arguments."""
    cls = type(estimator)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **estimator.arguments()}


class ProcessRunner:
    """The real `TrialRunner`: a trial's config is composed from the search's base overrides and its
    params, priced in this process (`metaopt.planning.plan` under the per-trial memory share, then down
    the `auto` ladder), and run in a spawned worker process under that share as its budget.

    Args:
      compose: overrides -> the trial's full train config.
      run_dir: trials run in run_dir/trials/<number>.
      threads: torch threads per worker.
      on_config: called with (trial, resolved config YAML) when a trial is priced (the study keeps it).
      group: the group of the trials' logged runs (the study's name).
    """

    def __init__(self, compose: Callable[[dict[str, Any]], DictConfig], run_dir: Path, threads: int,
                 on_config: Callable[[int, str], None] | None = None, group: str | None = None):
        self.compose, self.run_dir, self.threads, self.on_config = compose, run_dir, threads, on_config
        self.group = group
        self.configs: dict[int, str] = {}
        self.context = multiprocessing.get_context("spawn")
        self.idle: list[tuple[Any, Any, str]] = []  # (process, connection, allocator) of workers waiting for a trial

    def price(self, candidate: Candidate, memory_share: int, excluded: list[str]) -> Price | str:
        try:
            cfg = self.compose(candidate.params)
            parts = build(cfg)
        except Exception as error:  # a config that cannot be built cannot run either
            return f"cannot build: {type(error).__name__}: {error}"
        if cfg.get("allocator", "system") not in ALLOCATORS:  # (its worker would die at start)
            return f"cannot run: allocator={cfg.allocator!r} (use one of {', '.join(ALLOCATORS)})"
        budget = Budget(memory=memory_share, headroom=cfg.budget.headroom)
        outer = instantiate(cfg.outer_optim)(parts.meta.parameters())
        batch, sample_seconds = self._sample(cfg, parts)
        methods = [] if describe(parts.estimator) in excluded else [parts.estimator]  # type: ignore[arg-type]
        reason = "every estimator of the ladder was excluded"
        for method in methods + [_Ladder(excluded)]:
            try:
                chosen = plan(method, parts.loop, parts.meta, batch, budget, batching=cfg.batching,
                              device=cfg.device, fixed_bytes=optimizer_state_bytes(outer))
            except BudgetExceeded as error:
                reason = str(error)
                continue
            cfg.estimator = estimator_node(chosen.estimator)
            cfg.budget.memory = memory_share
            cfg.batching = chosen.batching  # the trial runs the batching it was priced with (auto times it once)
            self.configs[candidate.trial] = OmegaConf.to_yaml(cfg, resolve=True)
            if self.on_config is not None:
                self.on_config(candidate.trial, self.configs[candidate.trial])
            seconds = chosen.predicted_call_seconds
            return Price(chosen.predicted_peak_bytes, describe(chosen.estimator),
                         None if seconds is None else seconds + sample_seconds)
        return reason

    @staticmethod
    def _sample(cfg: DictConfig, parts: Any) -> tuple[Any, float]:
        """The batch the trial is priced on, and the seconds a meta-step's sampling takes (a meta-step samples its
        tasks, then computes the meta-gradient): the second of two draws, timed (the first may load data)."""
        def draw() -> Any:
            return task_to(parts.tasks.sample(cfg.meta_batch_size, cfg.inner_steps,
                                              torch.Generator().manual_seed(cfg.seed + 7919)), cfg.device)
        draw()
        started = time.perf_counter()
        batch = draw()
        return batch, time.perf_counter() - started

    def _worker(self, allocator: str) -> tuple[Any, Any]:
        """An idle worker whose process runs `allocator` (set once per process: glibc's settings cannot be undone),
        or a new one."""
        for entry in list(self.idle):
            process, conn, kept = entry
            if not process.is_alive():
                self.idle.remove(entry)
            elif kept == allocator:
                self.idle.remove(entry)
                return process, conn
        parent, child = self.context.Pipe()
        process = self.context.Process(target=worker_main, args=(child, self.threads, allocator), daemon=True)
        process.start()
        child.close()
        return process, parent

    def start(self, candidate: Candidate, rung_steps: list[int]) -> dict[str, Any]:
        config = cast(DictConfig, OmegaConf.create(self.configs[candidate.trial]))
        allocator = str(config.get("allocator", "system"))
        process, conn = self._worker(allocator)
        run_dir = self.run_dir / "trials" / str(candidate.trial)
        conn.send((self.configs[candidate.trial], str(run_dir), rung_steps, self.group))
        return {"process": process, "conn": conn, "finished": False, "waiting": False, "allocator": allocator}

    def poll(self, handle: dict[str, Any]) -> list[Message]:
        messages = []
        try:
            while handle["conn"].poll():
                kind, *rest = handle["conn"].recv()
                if kind == "rung":
                    messages.append(Message("rung", rung=rest[0]))
                    handle["waiting"] = True
                elif kind == "done":
                    messages.append(Message("done"))
                    handle["finished"] = True
                else:
                    messages.append(Message("error", error=rest[0], budget=bool(rest[1])))
                    handle["finished"] = True
        except (EOFError, OSError):
            pass
        if not messages and not handle["finished"] and not handle["process"].is_alive():
            handle["finished"] = True
            code = handle["process"].exitcode
            messages.append(Message("error", error=f"the worker process died (exit code {code}; "
                                                   f"-9: killed, e.g. out of memory)"))
        return messages

    def resume(self, handle: dict[str, Any]) -> None:
        handle["waiting"] = False
        handle["conn"].send("continue")

    def stop(self, handle: dict[str, Any]) -> None:
        """A finished trial, or one waiting at a rung boundary, frees its worker for the next trial; one in the
        middle of a rung (the deadline) has its worker terminated."""
        process, conn = handle["process"], handle["conn"]
        if process.is_alive() and (handle["finished"] or handle["waiting"]):
            if handle["waiting"] and not handle["finished"]:
                conn.send("stop")
            self.idle.append((process, conn, handle["allocator"]))
            return
        process.terminate()
        process.join(timeout=2)
        if process.is_alive():
            process.kill()
            process.join()
        conn.close()

    def close(self) -> None:
        """Stop the idle workers."""
        for process, conn, _ in self.idle:
            try:
                conn.send("exit")
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=2)
            if process.is_alive():
                process.terminate()
        self.idle.clear()
