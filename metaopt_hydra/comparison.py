"""A baselines comparison (`compare:`) planned before training, as every evaluation after training is.

`plan_comparison` builds every candidate of `compare.baselines` and `compare.ablations` (`candidates`), plans each
evaluation the comparison will run — a candidate's validation score when there are several to select from, and at
every unroll length of `compare.eval_inner_steps` the learned run's and each candidate's meta-test — within the
run's memory budget (`plan_config_evaluation`: the same plans run later, so the comparison's evaluations fit
`budget.memory` as the run's own do), and, when asked (`price=True`: under a job's wall-clock limit, and in a dry
run), times `TIMED_STEPS` meta-steps of each candidate that meta-trains (`metaopt_hydra.pricing`). Its
`predicted_seconds()` are then the comparison's whole price, entry by entry, which a `Deadline` reserves before the
first meta-step of the learned run. Approximate: the candidates' training is priced from their first few steps,
and the meta-test of the selected candidate, not yet known, is priced at the slowest of its group.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf, open_dict

from metaopt.checkpoint import load_checkpoint
from metaopt.deadline import Deadline
from metaopt.evaluation import EvalPlan
from metaopt_hydra.build import Parts, build, plan_config_evaluation
from metaopt_hydra.pricing import kept_random_state, left_to_train, timed_steps, training_seconds

__all__ = ["candidates", "check_compare", "PER_TASK", "plan_comparison", "select_n_tasks", "PlannedCandidate",
           "PlannedComparison"]

log = logging.getLogger("metaopt")

SECTIONS = ("baselines", "ablations")

PER_TASK = {"meta_test_loss": "task_losses", "test_accuracy": "task_accuracies"}
"""The metrics a comparison can pair: {metric: `evaluate`'s per-task entry}."""


def check_compare(cfg: DictConfig) -> None:
    """Refuse a `compare` section whose metric or direction is unknown, or beside an ensemble (before any work)."""
    if int(cfg.get("ensemble", 1)) > 1:
        raise ValueError("ensemble > 1 with compare: a learned-vs-baseline comparison of ensembles is not supported; "
                         "set compare=null or ensemble=1")
    if cfg.compare.get("metric") not in PER_TASK:
        raise ValueError(f"compare.metric must be one of {sorted(PER_TASK)}, got {cfg.compare.get('metric')!r}")
    if cfg.compare.get("direction") not in ("lower", "higher"):
        raise ValueError(f"compare.direction must be 'lower' or 'higher', got {cfg.compare.get('direction')!r}")


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


def select_n_tasks(cfg: DictConfig) -> int:
    """Validation tasks per candidate score: `compare.select_n_tasks`, else eval.n_tasks."""
    return int(cfg.compare.get("select_n_tasks") or cfg.eval.n_tasks)


@dataclass(frozen=True)
class PlannedCandidate:
    """A candidate as planned before training. `trains`: it has meta-parameters and meta_steps > 0, so it is
    meta-trained before it is scored; `validation`: its plan on `compare.select_n_tasks` validation tasks at the
    first unroll length (None: the only one of its section, nothing to select); `meta_test`: {unroll length: plan}
    on the meta-test tasks (every length where the comparison is priced, else filled by `meta_test_plan`);
    `train_seconds`: its training's predicted seconds (None: not priced) over `meta_steps` steps left (a
    checkpoint's finished steps not counted)."""

    section: str
    name: str
    label: str
    cfg: DictConfig
    parts: Parts
    trains: bool
    validation: EvalPlan | None
    meta_test: dict[int, EvalPlan]
    train_seconds: float | None = None
    meta_steps: int = 0

    def meta_test_plan(self, steps: int) -> EvalPlan:
        """Its meta-test plan at `steps` inner steps (planned now where the comparison was not priced: then only
        the selected candidate's are planned)."""
        if steps not in self.meta_test:
            assert self.parts.eval_tasks is not None, "build() refuses a comparison without meta-test tasks"
            self.meta_test[steps] = plan_config_evaluation(self.cfg, self.parts, self.parts.eval_tasks,
                                                           f"compare: {self.label} meta-tested",
                                                           self.cfg.eval.n_tasks, inner_steps=steps)
        return self.meta_test[steps]


@dataclass(frozen=True)
class PlannedComparison:
    """The comparison as planned: the unroll lengths, the learned run's meta-test plan at each, the candidates."""

    lengths: list[int]
    n_tasks: int  # meta-test tasks per evaluation (eval.n_tasks)
    select_n_tasks: int  # validation tasks per candidate score
    learned: dict[int, EvalPlan]
    candidates: list[PlannedCandidate]

    def section(self, section: str) -> list[PlannedCandidate]:
        return [c for c in self.candidates if c.section == section]

    def groups(self) -> dict[str, list[PlannedCandidate]]:
        """{"baselines": every baseline, "ablation NAME": its candidates}: each group's best meets the learned
        run on the meta-test."""
        out = {"baselines": self.section("baselines")}
        for c in self.section("ablations"):
            out.setdefault(f"ablation {c.name}", []).append(c)
        return out

    def predicted_seconds(self) -> dict[str, float | None]:
        """{what: predicted seconds} of every piece of the comparison (None: not timed or not priced)."""
        out: dict[str, float | None] = {}
        for c in self.candidates:
            if c.trains:
                out[f"compare: {c.label} trained ({c.meta_steps} meta-steps)"] = c.train_seconds
            if c.validation is not None:
                out[f"compare: {c.label} validated ({self.select_n_tasks} tasks)"] = \
                    c.validation.predicted_seconds(self.select_n_tasks)
        for group, members in self.groups().items():
            for steps in self.lengths:
                timed = [self.learned[steps].predicted_seconds(self.n_tasks),
                         *(c.meta_test[steps].predicted_seconds(c.cfg.eval.n_tasks) if steps in c.meta_test
                           else None for c in members)]
                known = [t for t in timed if t is not None]
                out[f"compare: learned vs {group} at {steps} inner steps ({self.n_tasks} tasks each)"] = \
                    None if len(known) < len(timed) else known[0] + max(known[1:])
        return out


def _candidate(cfg: DictConfig, section: str, name: str, label: str, base: DictConfig, lengths: list[int],
               select: bool, price: bool, checkpoint: Path | None) -> PlannedCandidate:
    parts = build(base)
    trains = int(base.meta_steps) > 0 and any(True for _ in parts.meta.parameters())
    assert parts.eval_tasks is not None, "build() refuses a comparison without meta-test tasks"
    validation = plan_config_evaluation(base, parts, parts.val_tasks or parts.tasks, f"compare: {label} validated",
                                        select_n_tasks(cfg), inner_steps=lengths[0]) if select else None
    seconds, steps_left = None, 0
    if trains:
        left = left_to_train(base, load_checkpoint(checkpoint) if checkpoint is not None and checkpoint.exists()
                             else None)
        steps_left = int(left.meta_steps)
        if price and steps_left > 0:
            seconds, steps_left = training_seconds(left, float(timed_steps(left, parts)["seconds_per_meta_step"]))
        elif price:
            seconds = 0.0
    candidate = PlannedCandidate(section, name, label, base, parts, trains, validation, {}, seconds, steps_left)
    for steps in lengths if price else ():
        candidate.meta_test_plan(steps)
    return candidate


def plan_comparison(cfg: DictConfig, learned: Parts, *, deadline: Deadline | None = None, price: bool = False,
                    run_dir: Path | None = None) -> PlannedComparison:
    """Build and plan the comparison of `cfg.compare` (see the module docstring) before the learned run trains.

    `learned`: the run's parts (untrained: a plan holds sizes and timings, not weights). `price`: time each
    candidate's training (implied by `deadline`, which then reserves every predicted piece). `run_dir`: the run's
    directory, where a resumed comparison's candidates have checkpoints (their finished steps are not priced).
    The global random state is left as it was: the learned run trains as it would have unplanned.
    """
    check_compare(cfg)
    spec = cfg.compare
    lengths = [int(t) for t in (spec.get("eval_inner_steps") or [cfg.eval.inner_steps])]
    assert learned.eval_tasks is not None, "build() refuses a comparison without meta-test tasks"
    price = price or deadline is not None
    with kept_random_state(cfg.device):  # build() seeds the global generator for each candidate
        planned = []
        for section in SECTIONS:
            pool = candidates(cfg, section)
            for i, (name, label, base) in enumerate(pool):
                checkpoint = None if run_dir is None else run_dir / section / str(i) / "checkpoint.pt"
                planned.append(_candidate(cfg, section, name, label, base, lengths, len(pool) > 1, price,
                                          checkpoint))
        learned_plans = {steps: plan_config_evaluation(cfg, learned, learned.eval_tasks,
                                                       "compare: learned meta-tested", cfg.eval.n_tasks,
                                                       inner_steps=steps) for steps in lengths}
    comparison = PlannedComparison(lengths, int(cfg.eval.n_tasks), select_n_tasks(cfg), learned_plans, planned)
    if deadline is not None:
        for what, seconds in comparison.predicted_seconds().items():
            deadline.reserve(what, seconds)
    return comparison
