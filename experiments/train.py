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

from common import build, make_logger, write_json_atomic
from metaopt.train import meta_train

log = logging.getLogger("metaopt")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    parts = build(cfg)
    outer_optimizer = hydra.utils.instantiate(cfg.outer_optim)(parts.meta.parameters())
    log_fn, finish = make_logger(cfg, run_dir)
    try:
        metrics = meta_train(
            parts.loop, parts.meta, parts.estimator, parts.tasks,
            outer_optimizer=outer_optimizer, meta_steps=cfg.meta_steps, meta_batch_size=cfg.meta_batch_size,
            inner_steps=cfg.inner_steps, budget=parts.budget, batching=cfg.batching, seed=cfg.seed,
            eval_tasks=parts.eval_tasks, eval_inner_steps=cfg.eval.inner_steps, eval_n_tasks=cfg.eval.n_tasks,
            checkpoint_path=run_dir / "checkpoint.pt", checkpoint_every=cfg.checkpoint_every,
            log=log_fn, log_every=cfg.log_every, progress=cfg.progress, device=cfg.device, on_nan=cfg.on_nan,
            max_grad_norm=cfg.max_grad_norm, eval_batch_size=cfg.eval.batch_size)
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
