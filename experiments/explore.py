"""The budgeted explorer: give total memory and total time, get the Pareto front of configurations.

    python experiments/explore.py search=sinusoid_maml explore.memory=8GB explore.time=20m
    python experiments/explore.py search=omniglot_maml data.root=PATH explore.memory=16GB explore.time=1h
    python experiments/explore.py --multirun explore.worker=0,1 hydra/launcher=slurm \\
        explore.storage=postgresql://HOST/DB   # several machines, one study

Writes into the run directory: pareto.csv (every trial), front.md, pareto.png, events.jsonl,
best/trial_N.yaml (runnable: python experiments/train.py --config-dir DIR/best --config-name
trial_N), trials/N/ (each trial's checkpoint and metrics.json), and study.journal (the Optuna
study; re-running the same command continues it). See metaopt_hydra/explore/app.py.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from metaopt_hydra.explore.app import run_explore


@hydra.main(version_base="1.3", config_path="../conf", config_name="explore")
def main(cfg: DictConfig) -> float:
    return run_explore(cfg)


if __name__ == "__main__":
    main()
