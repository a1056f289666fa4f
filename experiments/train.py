"""Meta-train and meta-test: python experiments/train.py [experiment=NAME] [overrides].

Writes into the Hydra run dir: `checkpoint.pt` (atomic; a rerun in the same dir
resumes from it), `metrics.json` (meta_test_loss, meta_test_loss_ci95, meta_steps,
estimator, ...; with a `compare` section also `learned`, `baseline`, `metric_direction`:
see experiments/baselines.py), and Hydra's `.hydra/` config record.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from baselines import compare
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from common import build, make_logger, train_from_config, write_json_atomic

log = logging.getLogger("metaopt")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    parts = build(cfg)
    log_fn, finish = make_logger(cfg, run_dir)
    try:
        metrics = train_from_config(cfg, parts, run_dir, log=log_fn)
        if cfg.get("compare"):
            metrics.update(compare(cfg, parts, run_dir))
        if log_fn is not None:
            log_fn({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, cfg.meta_steps)
    except Exception as error:
        # The checkpoint is already saved; leave a readable record of why the run stopped.
        write_json_atomic({"status": "failed", "error": f"{type(error).__name__}: {error}",
                           "estimator": parts.estimator.name, "meta_steps": cfg.meta_steps,
                           "budget_memory_bytes": parts.budget.memory, "budget_time_seconds": parts.budget.time,
                           "config": OmegaConf.to_container(cfg, resolve=True)}, run_dir / "metrics.json")
        raise
    finally:
        finish()
    metrics["status"] = "ok"
    metrics["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_json_atomic(metrics, run_dir / "metrics.json")
    summary = f"meta-test loss {metrics['meta_test_loss']:.4f} ± {metrics['meta_test_loss_ci95']:.4f}"
    if "test_accuracy" in metrics:
        summary += f", accuracy {100 * metrics['test_accuracy']:.2f} ± {100 * metrics['test_accuracy_ci95']:.2f}%"
    if "learned" in metrics:
        print(f"{metrics['metric']}: learned {metrics['learned']:.4f} ± {metrics['learned_ci95']:.4f}, baseline "
              f"{metrics['baseline']:.4f} ± {metrics['baseline_ci95']:.4f} ({metrics['baseline_name']}); "
              f"learned - baseline {metrics['difference']:+.4f} ± {metrics['difference_ci95']:.4f} "
              f"(paired, same tasks; {metrics['metric_direction']})")
    print(f"{summary} (95% CI over {cfg.eval.n_tasks} tasks, {cfg.eval.inner_steps} inner step(s), "
          f"{parts.estimator.name}, {cfg.meta_steps} meta-steps) -> {run_dir / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
