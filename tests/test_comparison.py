"""A baselines comparison planned before training: every evaluation planned within the budget, priced, and reserved
under a job's wall-clock limit, without changing a figure (metaopt_hydra.comparison)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_experiments import KIND_EXPERIMENTS, ROOT, run_train

from metaopt_hydra.build import build
from metaopt_hydra.comparison import check_compare, plan_comparison

SMALL = ["experiment=learned_optimizer", "progress=false", *KIND_EXPERIMENTS["learned_optimizer"],
         "~compare.baselines.adam"]  # sgd's 4 candidates, then adam_meta_learned_lr
TRAINS = 4  # the index of adam_meta_learned_lr, the one baseline that meta-trains, after sgd's 4 (adam's 6 dropped)


def _config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[*SMALL[:1], *SMALL[2:], *overrides])


def test_a_job_time_limit_reserves_the_whole_comparison_and_changes_no_figure(tmp_path):
    assert run_train(tmp_path / "free", *SMALL).returncode == 0
    result = run_train(tmp_path / "limited", *SMALL, "job_time_limit=10m")
    assert result.returncode == 0, result.stderr[-3000:]
    free, limited = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("free", "limited"))
    for key in ("learned", "baseline", "difference", "baseline_name", "baseline_candidates", "at_inner_steps",
                "meta_test_loss"):
        assert limited[key] == free[key], key  # pricing (builds, timed steps on copies) leaves the run as it was
    reserved = limited["job_reserved"]
    assert limited["job_unreserved"] == [] and all(seconds >= 0 for seconds in reserved.values())
    assert "compare: adam_meta_learned_lr trained (2 meta-steps)" in reserved
    assert sum(what.endswith("validated (2 tasks)") for what in reserved) == 5  # every candidate: one is selected
    assert {what for what in reserved if " vs " in what} == {
        f"compare: learned vs baselines at {steps} inner steps (4 tasks each)" for steps in (2, 4)}
    log = (tmp_path / "limited" / "train.log").read_text()
    assert log.index("compare: learned meta-tested") < log.index("left for training")
    assert "meta-step 2/2" in log[log.index("left for training"):]  # the learned run trains after the pricing


def test_the_price_is_every_piece_and_the_selected_meta_test_at_the_slowest_of_its_group():
    cfg = _config()
    parts = build(cfg)
    before = torch.get_rng_state()
    planned = plan_comparison(cfg, parts, price=True)
    assert torch.equal(torch.get_rng_state(), before)  # the candidates' builds seed it: restored
    assert [c.trains for c in planned.candidates] == [i == TRAINS for i in range(5)]
    assert planned.candidates[TRAINS].meta_steps == 2 and planned.candidates[TRAINS].train_seconds > 0
    prices = planned.predicted_seconds()
    for steps in (2, 4):
        group = max(c.meta_test[steps].predicted_seconds(4) for c in planned.candidates)
        assert prices[f"compare: learned vs baselines at {steps} inner steps (4 tasks each)"] == pytest.approx(
            planned.learned[steps].predicted_seconds(4) + group)
    unpriced = plan_comparison(cfg, parts)  # without a deadline, nothing is timed but the evaluations' plans
    assert unpriced.candidates[TRAINS].train_seconds is None and unpriced.candidates[TRAINS].meta_test == {}
    assert unpriced.predicted_seconds()["compare: adam_meta_learned_lr trained (2 meta-steps)"] is None


def test_every_evaluation_of_the_comparison_is_planned_within_the_runs_memory_budget(monkeypatch):
    """The comparison's evaluations had planned themselves on `Budget()`, the machine's memory, whatever
    `budget.memory` said; each is now sized to the run's budget."""
    from metaopt import evaluation
    seen = []
    sized = evaluation._batched_piece

    def recording(scores, budget, *args):
        seen.append(budget.memory)
        return sized(scores, budget, *args)

    monkeypatch.setattr(evaluation, "_batched_piece", recording)
    cfg = _config("budget.memory=3GB")
    parts = build(cfg)
    planned = plan_comparison(cfg, parts)
    planned.candidates[0].meta_test_plan(2)  # the selected candidate's, planned when it is meta-tested
    assert len(seen) == 5 + 2 + 1 and set(seen) == {parts.budget.memory} and parts.budget.memory == 3e9


@pytest.mark.parametrize("done, left", [(1, 1), (2, 0)])
def test_a_resumed_comparison_prices_only_the_steps_its_checkpoints_have_not_taken(tmp_path, done, left):
    cfg = _config()
    checkpoint = tmp_path / "baselines" / str(TRAINS) / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"meta_step": done, "train_seconds": 1.0}, checkpoint)
    candidate = plan_comparison(cfg, build(cfg), price=True, run_dir=tmp_path).candidates[TRAINS]
    assert candidate.meta_steps == left and (candidate.train_seconds == 0.0) == (left == 0)
    assert math.isfinite(candidate.train_seconds)


@pytest.mark.parametrize("override, message", [("compare.metric=f1", "compare.metric must be one of"),
                                               ("compare.direction=up", "compare.direction must be"),
                                               ("ensemble=2", "comparison of ensembles is not supported")])
def test_an_unknown_metric_or_direction_or_an_ensemble_is_refused_before_any_work(override, message):
    cfg = _config(override)
    with pytest.raises(ValueError, match=message):
        check_compare(cfg)
    with pytest.raises(ValueError, match=message):  # first thing, before building a candidate or the learned run
        plan_comparison(cfg, None)  # type: ignore[arg-type]
