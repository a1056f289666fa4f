"""Meta-train and meta-test: python experiments/train.py [experiment=NAME] [overrides].

Writes into the Hydra run dir: `checkpoint.pt` (atomic; a rerun in the same dir resumes
from it, after checking that the config is the same), `metrics.json` (status, meta_test_loss,
meta_test_loss_ci95, val_loss, meta_steps, estimator, ...; on failure the status and the
error; with a `compare` section also `learned`, `baseline`, `metric_direction`: see
metaopt_hydra/baselines.py), `curves.png`, and Hydra's `.hydra/` config record. Returns the
objective (`objective`, default meta_test_loss) for Hydra sweepers. See metaopt_hydra/app.py.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from metaopt_hydra.app import run_training


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run_training(cfg)


if __name__ == "__main__":
    main()
