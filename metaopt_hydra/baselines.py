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

Everything is planned before the learned run trains (`metaopt_hydra.comparison.plan_comparison`): the candidates
built, every evaluation planned within the run's memory budget, and under a job's wall-clock limit the whole
comparison priced and reserved; `compare` runs that plan.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from metaopt.evaluation import EvalPlan
from metaopt.train import evaluate, mean_ci95
from metaopt_hydra.build import Parts, train_from_config
from metaopt_hydra.comparison import (PER_TASK, PlannedCandidate, PlannedComparison, candidates, plan_comparison,
                                      select_n_tasks)

__all__ = ["compare", "candidates"]

log = logging.getLogger("metaopt")

def _evaluate(cfg: DictConfig, parts: Parts, steps: int, plan: EvalPlan, *, validation: bool = False,
              n_tasks: int | None = None) -> dict[str, Any]:
    tasks = (parts.val_tasks or parts.tasks) if validation else parts.eval_tasks
    assert tasks is not None, "build() refuses a comparison without meta-test tasks"
    return evaluate(parts.loop, parts.meta, tasks, n_tasks=n_tasks or cfg.eval.n_tasks, inner_steps=steps,
                    batch_size=cfg.eval.batch_size, seed=cfg.eval.seed + (1 if validation else 0),
                    device=cfg.device, return_per_task=True, budget=parts.budget, plan=plan)


def compare(cfg: DictConfig, learned: Parts, run_dir: Path,
            planned: PlannedComparison | None = None) -> dict[str, Any]:
    """Evaluate the learned run and its best baseline on the same meta-test tasks, as `planned` (default:
    planned now, `plan_comparison`).

    Returns the metrics.json entries: `learned`, `baseline` (the headline metric at the
    first unroll length), their CIs, `metric_direction`, the paired difference and its CI,
    the chosen baseline's label, every candidate's validation score, and per unroll length
    the same figures under `at_inner_steps`; with `compare.ablations`, `ablations`:
    {name: {"label": its validation-best candidate, "candidates": validation scores, "at_inner_steps": ...}}.
    """
    planned = planned or plan_comparison(cfg, learned, run_dir=run_dir)
    metric, direction = cfg.compare.metric, cfg.compare.direction
    sign = 1 if direction == "lower" else -1

    def best_of(group: list[_Candidate]) -> _Candidate:
        return group[0] if len(group) == 1 else min(group, key=lambda c: sign * c.score)

    scored = _train_and_score(cfg, planned.section("baselines"), run_dir / "baselines", planned.lengths[0])
    best = best_of(scored)
    out: dict[str, Any] = {"metric": metric, "metric_direction": f"{direction} is better",
                           "baseline_name": best.planned.label,
                           "baseline_candidates": {c.planned.label: c.score for c in scored},
                           "at_inner_steps": _paired(cfg, learned, best.planned, metric, planned)}
    out.update(out["at_inner_steps"][planned.lengths[0]])
    ablations = _train_and_score(cfg, planned.section("ablations"), run_dir / "ablations", planned.lengths[0])
    if ablations:
        out["ablations"] = {}
        for name in dict.fromkeys(c.planned.name for c in ablations):
            group = [c for c in ablations if c.planned.name == name]
            top = best_of(group)
            out["ablations"][name] = {"label": top.planned.label,
                                      "candidates": {c.planned.label: c.score for c in group},
                                      "at_inner_steps": _paired(cfg, learned, top.planned, metric, planned)}
    return out


class _Candidate:
    """A planned candidate with its validation score (nan when there is nothing to select)."""

    def __init__(self, score: float, planned: PlannedCandidate):
        self.score, self.planned = score, planned


def _train_and_score(cfg: DictConfig, pool: list[PlannedCandidate], root: Path, steps: int) -> list[_Candidate]:
    """Meta-train every candidate that learns (in root/i: resumed from its checkpoint); score each on
    validation tasks where it was planned to be (several to select from)."""
    scored = []
    for i, candidate in enumerate(pool):
        if candidate.trains:
            (root / str(i)).mkdir(parents=True, exist_ok=True)
            train_from_config(candidate.cfg, candidate.parts, root / str(i), evaluate=False)
        score = float("nan")  # one candidate: nothing to select
        if candidate.validation is not None:
            score = _evaluate(candidate.cfg, candidate.parts, steps, candidate.validation, validation=True,
                              n_tasks=select_n_tasks(cfg))[cfg.compare.metric]
        log.info("candidate %s: validation %s %.4f", candidate.label, cfg.compare.metric, score)
        scored.append(_Candidate(score, candidate))
    return scored


def _paired(cfg: DictConfig, learned: Parts, baseline: PlannedCandidate, metric: str,
            planned: PlannedComparison) -> dict[int, dict[str, float]]:
    """learned and `baseline` on the same meta-test tasks at each unroll length, with the paired difference."""
    out = {}
    for steps in planned.lengths:
        mine = _evaluate(cfg, learned, steps, planned.learned[steps])
        theirs = _evaluate(baseline.cfg, baseline.parts, steps, baseline.meta_test_plan(steps))
        diff, diff_ci = mean_ci95(mine[PER_TASK[metric]] - theirs[PER_TASK[metric]])
        out[steps] = {"learned": mine[metric], "learned_ci95": mine[metric + "_ci95"],
                      "baseline": theirs[metric], "baseline_ci95": theirs[metric + "_ci95"],
                      "difference": diff, "difference_ci95": diff_ci}
    return out
