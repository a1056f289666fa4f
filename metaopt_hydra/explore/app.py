"""`experiments/explore.py`: one explorer worker, from conf/explore.yaml and a search space (conf/search/).

    python experiments/explore.py search=sinusoid_maml explore.memory=8GB explore.time=20m

The user states the total memory and time; the explorer (`metaopt.explore.Explorer`) draws
configurations from the search space through an Optuna study, prices each with the planner,
packs trials into the memory by their predicted peaks, advances them in rungs of meta-steps,
prunes the dominated, breeds children around the front, and at the deadline writes the front.
Several workers (a Hydra multirun, `explore.worker=0,1,...`, on any launcher) share one study
through `explore.storage`. Re-running the same command continues the study.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metaopt.budget import parse_bytes, parse_seconds
from metaopt.explore import Explorer
from metaopt_hydra.explore.report import front_of, rung_price_summary, time_summary, write_report
from metaopt_hydra.explore.runner import ProcessRunner
from metaopt_hydra.explore.search import SearchSpace
from metaopt_hydra.explore.study import ExplorerStudy, open_storage
from metaopt_hydra.threads import apply_threads, available_cores

__all__ = ["run_explore"]

log = logging.getLogger("metaopt")
REPORT_SECONDS = 15.0  # kept from the time budget for stopping workers and writing the front


def _threads(cfg: DictConfig) -> int:
    if cfg.explore.get("threads"):
        return int(cfg.explore.threads)
    return max(1, available_cores() // int(cfg.explore.max_parallel))


def run_explore(cfg: DictConfig) -> float:
    """Explore until `explore.time`; write the outputs; return the best validation loss found."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    apply_threads(1)  # this process only plans; the trials compute in their workers
    space = SearchSpace(cfg.search.params)
    memory, seconds = parse_bytes(cfg.explore.memory), parse_seconds(cfg.explore.time)
    share = memory // int(cfg.explore.max_parallel)
    study = ExplorerStudy(open_storage(cfg.explore.storage, run_dir), cfg.explore.study_name, space,
                          worker=str(cfg.explore.worker), memory_share=share, seed=int(cfg.explore.seed))
    stale = study.fail_stale()
    if stale:
        log.warning("resumed study %s: %d trial(s) left running by a killed explorer told failed", cfg.explore.study_name,
                    stale)
    # Resolved: ${data.root} takes the explore config's value; an escaped \${inner_steps} becomes the trial
    # config's own interpolation.
    base = [str(o) for o in OmegaConf.to_container(cfg.search.get("base") or [], resolve=True)]  # type: ignore

    logged = [f"logger={cfg.explore.logger}"] if cfg.explore.get("logger") else []

    def compose_trial(params: dict[str, Any]) -> DictConfig:
        return compose(config_name="train", overrides=base + logged + space.overrides(params))

    runner = ProcessRunner(compose_trial, run_dir, _threads(cfg), on_config=study.keep_config,
                           group=str(cfg.explore.study_name))
    events = open(run_dir / "events.jsonl", "a")

    def on_event(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    explorer = Explorer(runner, study, memory=memory, time_budget=max(1.0, seconds - REPORT_SECONDS),
                        max_parallel=int(cfg.explore.max_parallel), rung_steps=int(cfg.explore.rung_steps),
                        eta=int(cfg.explore.eta), rungs=int(cfg.explore.rungs), queue_size=int(cfg.explore.queue_size),
                        children=int(cfg.explore.children), perturb=space.perturb, previous=study.records(),
                        max_trials=cfg.explore.get("max_trials"), seed=int(cfg.explore.seed), on_event=on_event,
                        progress=lambda line: print(f"[explore] {line}", file=sys.stderr, flush=True),
                        progress_every=float(cfg.explore.progress_every))
    started = time.perf_counter()
    quiet = logging.getLogger("metaopt").level
    logging.getLogger("metaopt").setLevel(logging.WARNING)  # pricing builds many configs: keep the progress lines
    try:
        explorer.run()
    finally:
        logging.getLogger("metaopt").setLevel(quiet)
        runner.close()
        events.close()
    records = study.records()  # every worker's finished trials
    configs = {r.trial: study.config(r.trial) for r in front_of(records)}
    table = write_report(records, run_dir, list(space.distributions), configs)
    print(table)
    print(f"{len(records)} trial(s) in {time.perf_counter() - started:.0f} s -> {run_dir / 'pareto.csv'}, "
          f"{run_dir / 'pareto.png'}, {run_dir / 'best'}")
    print(time_summary(records))
    print(rung_price_summary(explorer.rung_prices))  # this worker's trials
    return min((r.val_loss for r in records if r.rungs), default=float("nan"))
