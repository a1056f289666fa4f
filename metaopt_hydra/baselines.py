"""Learned meta-parameters against non-learned (or differently learned) baselines, on the same tasks.

A config's `compare` section (see conf/experiment/distill_digits.yaml):

    compare:
      metric: test_accuracy          # a key of metaopt.train.evaluate's result
      direction: higher              # higher | lower: which way is better
      eval_inner_steps: [10]         # unroll lengths to evaluate at; the first one is the headline
      select_n_tasks: 200            # validation tasks that pick the best baseline candidate
      baselines:
        real_images:                 # a name
          overrides: {metaparam: {data: null}}   # merged into the run's config (a list: merged in order)
          grid: {inner_optim.lr: [0.1, 0.3]}     # optional: one candidate per combination
      ablations:                     # optional, same form as baselines: meta-tested against the learned
        fixed_warps: {...}           # run (each name's validation-best candidate), never the headline

Each candidate is built from the merged config and, if it still has meta-parameters and
`meta_steps > 0`, meta-trained like the learned run (in DIR/baselines/NAME). With several
candidates, the best on validation tasks — fresh tasks from the *training* distribution,
another seed — is the baseline (a tuned baseline never sees the meta-test tasks). The
learned run and the baseline are then evaluated on the same seeded meta-test tasks, and
the paired per-task difference gives a 95% CI of learned - baseline. Each name under
`ablations` (e.g. fixed random warps against learned ones) is trained and selected the same
way and meta-tested against the learned run, under `ablations` in metrics.json.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, NamedTuple, cast

from omegaconf import DictConfig, OmegaConf, open_dict

from metaopt.train import evaluate, mean_ci95
from metaopt_hydra.build import Parts, build, eval_batching, train_from_config

log = logging.getLogger("metaopt")

_PER_TASK = {"meta_test_loss": "task_losses", "test_accuracy": "task_accuracies"}


def candidates(cfg: DictConfig, section: str = "baselines") -> list[tuple[str, str, DictConfig]]:
    """(name, label, config) of every candidate of `cfg.compare[section]` ("baselines" or "ablations")."""
    out = []
    # Resolved first, so interpolations keep the learned run's values when overrides null a node.
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for name, spec in (cfg.compare.get(section) or {}).items():
        grid = dict(spec.get("grid") or {})
        for values in itertools.product(*grid.values()):
            overrides = spec.get("overrides") or {}
            # A list is merged in order: [{slot: null}, {slot: {...}}] replaces a node instead of merging into it.
            base = OmegaConf.merge(resolved, *(overrides if OmegaConf.is_list(overrides) else [overrides]))
            with open_dict(base):
                base.compare = None
                for key, value in zip(grid, values):
                    OmegaConf.update(base, key, value, force_add=True)
            label = name + "".join(f" {k}={v}" for k, v in zip(grid, values))
            out.append((name, label, cast(DictConfig, base)))
    if not out and section == "baselines":
        raise ValueError("compare.baselines is empty: name at least one baseline")
    return out


def _evaluate(cfg: DictConfig, parts: Parts, steps: int, *, validation: bool = False,
              n_tasks: int | None = None) -> dict[str, Any]:
    tasks = (parts.val_tasks or parts.tasks) if validation else parts.eval_tasks
    assert tasks is not None, "build() refuses a comparison without meta-test tasks"
    return evaluate(parts.loop, parts.meta, tasks, n_tasks=n_tasks or cfg.eval.n_tasks, inner_steps=steps,
                    batch_size=cfg.eval.batch_size,
                    seed=cfg.eval.seed + (1 if validation else 0), batching=eval_batching(cfg), device=cfg.device,
                    return_per_task=True)


def _train(cfg: DictConfig, parts: Parts, run_dir: Path) -> None:
    if cfg.meta_steps <= 0 or not any(True for _ in parts.meta.parameters()):
        return  # nothing to learn: the baseline is its config as written
    run_dir.mkdir(parents=True, exist_ok=True)
    train_from_config(cfg, parts, run_dir, evaluate=False)


def compare(cfg: DictConfig, learned: Parts, run_dir: Path) -> dict[str, Any]:
    """Evaluate the learned run and its best baseline on the same meta-test tasks.

    Returns the metrics.json entries: `learned`, `baseline` (the headline metric at the
    first unroll length), their CIs, `metric_direction`, the paired difference and its CI,
    the chosen baseline's label, every candidate's validation score, and per unroll length
    the same figures under `at_inner_steps`; with `compare.ablations`, `ablations`:
    {name: {"label": its validation-best candidate, "candidates": validation scores, "at_inner_steps": ...}}.
    """
    spec = cfg.compare
    metric, direction = spec.metric, spec.direction
    if metric not in _PER_TASK:
        raise ValueError(f"compare.metric must be one of {sorted(_PER_TASK)}, got {metric!r}")
    if direction not in ("lower", "higher"):
        raise ValueError(f"compare.direction must be 'lower' or 'higher', got {direction!r}")
    lengths = [int(t) for t in (spec.get("eval_inner_steps") or [cfg.eval.inner_steps])]
    sign = 1 if direction == "lower" else -1

    def best_of(group: list[_Candidate]) -> _Candidate:
        return group[0] if len(group) == 1 else min(group, key=lambda c: sign * c.score)

    scored = _train_and_score(cfg, candidates(cfg), run_dir / "baselines", lengths[0])
    best = best_of(scored)
    out: dict[str, Any] = {"metric": metric, "metric_direction": f"{direction} is better",
                           "baseline_name": best.label, "baseline_candidates": {c.label: c.score for c in scored},
                           "at_inner_steps": _paired(cfg, learned, best, metric, lengths)}
    out.update(out["at_inner_steps"][lengths[0]])
    ablations = _train_and_score(cfg, candidates(cfg, "ablations"), run_dir / "ablations", lengths[0])
    if ablations:
        out["ablations"] = {}
        for name in dict.fromkeys(c.name for c in ablations):
            group = [c for c in ablations if c.name == name]
            top = best_of(group)
            out["ablations"][name] = {"label": top.label, "candidates": {c.label: c.score for c in group},
                                      "at_inner_steps": _paired(cfg, learned, top, metric, lengths)}
    return out


def _train_and_score(cfg: DictConfig, pool: list[tuple[str, str, DictConfig]], root: Path,
                     steps: int) -> list[_Candidate]:
    """Build and (meta-)train every candidate; score each on validation tasks unless it is the only one."""
    scored = []
    for i, (name, label, base_cfg) in enumerate(pool):
        parts = build(base_cfg)
        _train(base_cfg, parts, root / str(i))
        score = (_evaluate(base_cfg, parts, steps, validation=True, n_tasks=cfg.compare.select_n_tasks)[cfg.compare.metric]
                 if len(pool) > 1 else float("nan"))  # one candidate: nothing to select
        log.info("candidate %s: validation %s %.4f", label, cfg.compare.metric, score)
        scored.append(_Candidate(score, name, label, parts, base_cfg))
    return scored


class _Candidate(NamedTuple):
    score: float  # the validation metric (nan when there is nothing to select)
    name: str
    label: str
    parts: Parts
    cfg: DictConfig


def _paired(cfg: DictConfig, learned: Parts, baseline: _Candidate, metric: str,
            lengths: list[int]) -> dict[int, dict[str, float]]:
    """learned and `baseline` on the same meta-test tasks at each unroll length, with the paired difference."""
    out = {}
    for steps in lengths:
        mine, theirs = _evaluate(cfg, learned, steps), _evaluate(baseline.cfg, baseline.parts, steps)
        diff, diff_ci = mean_ci95(mine[_PER_TASK[metric]] - theirs[_PER_TASK[metric]])
        out[steps] = {"learned": mine[metric], "learned_ci95": mine[metric + "_ci95"],
                      "baseline": theirs[metric], "baseline_ci95": theirs[metric + "_ci95"],
                      "difference": diff, "difference_ci95": diff_ci}
    return out
