"""Compare meta-gradient estimators on the same tasks: accuracy against full, time, peak memory.

    python experiments/compare_estimators.py task=sinusoid 'inner_steps=[10,100,1000]'
    python experiments/compare_estimators.py task=patterns model=conv4 'inner_steps=[10,100]'

For every T in the grid and every estimator, each of `tasks` tasks runs alone:
  cosine_to_full, rel_error  the estimate against full backprop's meta-gradient of the same task
                             (cosine similarity, and ||g - g_full|| / ||g_full||), averaged over tasks;
  seconds                    the median wall-clock of one meta-gradient over tasks x repeats;
  peak_bytes                 the largest, over tasks, peak memory of one call above the level before
                             it (metaopt.memory). CPU: the process's peak resident set size after
                             malloc_trim and a peak reset, so it includes autograd-graph overhead
                             (experiments/bench_memory.py checks it against a fresh process's peak
                             RSS). CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats
                             (device tensor bytes).
An estimator that cannot serve the configuration gets a row with its reason in `status`.
Writes comparison.csv and comparison.png (error, time and memory against T, log axes) in the run dir.
"""
from __future__ import annotations

import csv
import logging
import math
import statistics
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from metaopt import InnerLoop, unstack_tasks
from metaopt.estimators import EstimatorUnsupported, Full
from metaopt.memory import measure_peak_memory
from metaopt.train import task_to
from metaopt_hydra.build import build_meta

log = logging.getLogger("metaopt")
COLUMNS = ["estimator", "T", "cosine_to_full", "rel_error", "seconds", "peak_bytes", "status"]


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.detach().flatten().double() for g in grads.values()])


def _compare(estimate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    cosine = torch.nn.functional.cosine_similarity(estimate, reference, dim=0).item()
    return cosine, ((estimate - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def measure(estimator, loop, meta, tasks, references, cfg) -> dict:
    """One row: accuracy, time and memory of `estimator` over `tasks`."""
    cosines, errors, seconds, peaks = [], [], [], []
    for task, reference in zip(tasks, references):
        grads = estimator(loop, meta, [task]).grads  # also the warm-up call
        cosine, error = _compare(_flat(grads), reference)
        cosines.append(cosine)
        errors.append(error)
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            estimator(loop, meta, [task])
            seconds.append(time.perf_counter() - start)
        if cfg.measure_memory:
            with measure_peak_memory(cfg.device) as memory:
                estimator(loop, meta, [task])
            peaks.append(memory.peak_bytes)
    return {"cosine_to_full": statistics.fmean(cosines), "rel_error": statistics.fmean(errors),
            "seconds": statistics.median(seconds), "peak_bytes": max(peaks) if peaks else -1, "status": "ok"}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("rel_error", "relative error to full"), ("seconds", "seconds per meta-gradient"),
              ("peak_bytes", "peak memory (bytes)")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(dict.fromkeys(r["estimator"] for r in rows)):
        ok = [r for r in rows if r["estimator"] == name and r["status"] == "ok"]
        for ax, (key, _) in zip(axes, panels):
            points = [(r["T"], r[key]) for r in ok if r[key] > 0]  # log axes: exact zeros are not drawn
            if points:
                ax.plot(*zip(*points), marker="o", label=name, color=colors[i % len(colors)])
    for ax, (_, title) in zip(axes, panels):
        ax.set(xscale="log", yscale="log", xlabel="inner steps T", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    torch.manual_seed(cfg.seed)
    torch.set_default_dtype(getattr(torch, cfg.dtype))
    task_distribution = instantiate(cfg.task)
    model = instantiate(cfg.model).to(cfg.device)
    meta = build_meta(cfg, model)
    loop = InnerLoop(model, instantiate(cfg.inner_optim), task_distribution.loss_fn, proximal=cfg.proximal)
    estimators = {name: instantiate(c) for name, c in cfg.estimators.items()}
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for steps in cfg.inner_steps:
        tasks = [t for t in unstack_tasks(task_distribution.sample(cfg.tasks, steps, generator))]
        tasks = [task_to(t, cfg.device) for t in tasks]
        references = [_flat(Full()(loop, meta, [t]).grads) for t in tasks]
        for name, estimator in estimators.items():
            try:
                estimator.check(loop, meta)
            except EstimatorUnsupported as e:
                rows.append({"estimator": name, "T": steps, "cosine_to_full": math.nan, "rel_error": math.nan,
                             "seconds": math.nan, "peak_bytes": -1, "status": f"unsupported: {e}"})
                log.info("T=%d %s: unsupported (%s)", steps, name, e)
                continue
            row = {"estimator": name, "T": steps, **measure(estimator, loop, meta, tasks, references, cfg)}
            rows.append(row)
            log.info("T=%d %s: cos %.4f rel_err %.3g %.4fs %d bytes", steps, name, row["cosine_to_full"],
                     row["rel_error"], row["seconds"], row["peak_bytes"])
    with open(run_dir / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, run_dir / "comparison.png")
    print(f"{'estimator':<12} {'T':>5} {'cos_to_full':>11} {'rel_error':>10} {'seconds':>9} {'peak_bytes':>11}  status")
    for r in rows:
        print(f"{r['estimator']:<12} {r['T']:>5} {r['cosine_to_full']:>11.4f} {r['rel_error']:>10.3g} "
              f"{r['seconds']:>9.4f} {r['peak_bytes']:>11d}  {r['status'][:60]}")
    print(f"-> {run_dir / 'comparison.csv'}, {run_dir / 'comparison.png'}")


if __name__ == "__main__":
    main()
